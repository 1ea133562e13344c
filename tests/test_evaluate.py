"""zoodip-eval end to end on the tiny pipeline with tiny CLIP and DINOv2 folders (paper S1.1-S1.2, S3.3)."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from tests.conftest import compose_train, same_weights
from zoodip.data.prompts import eval_prompts
from zoodip.errors import ZoodipError
from zoodip.evaluation.evaluate import Validator, evaluate_run, load_vae, main, preflight, prepare_config
from zoodip.method.objective import TextConditioner
from zoodip.models.loading import ModelSettings, load_components
from zoodip.models.tiny import make_tiny
from zoodip.runtime.train import run


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("eval-models") / "tiny", eval_models=True)


@pytest.fixture(scope="module")
def shrink(tiny_dir):
    """The protocol with one image per prompt, two diversity images and two denoising steps."""
    return {
        "eval.images_per_prompt": 1,
        "eval.diversity_images": 2,
        "eval.num_inference_steps": 2,
        "eval.batch_size": 13,
        "eval.clip.path": str(tiny_dir / "clip"),
        "eval.dino.path": str(tiny_dir / "dinov2"),
    }


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_dir, subject_dir):
    """A finished two-step run on the tiny pipeline, with the .hydra/config.yaml Hydra would have written."""
    cfg = compose_train(
        "model.init=pretrained",
        f"model.path={tiny_dir}",
        f"data.path={subject_dir}",
        "data.subject=dog6",
        "train.steps=2",
    )
    out = tmp_path_factory.mktemp("runs") / "run"
    run(cfg, out)
    (out / ".hydra").mkdir()
    OmegaConf.save(cfg, out / ".hydra" / "config.yaml")
    return out


@pytest.fixture(scope="module")
def evaluated(run_dir, shrink):
    metrics = evaluate_run(run_dir, shrink)
    images = {p.name: p.read_bytes() for p in sorted((run_dir / "eval" / "images").iterdir())}
    return metrics, images


def test_every_prompt_is_scored(run_dir, evaluated):
    frame = pd.read_csv(run_dir / "eval" / "scores.csv")
    assert list(frame.columns) == ["prompt", "seed", "clip_t", "clip_i", "dino"]
    prompts = eval_prompts("<dog6>", "dog", living=True, use_class_token=False)
    assert frame["prompt"].value_counts().to_dict() == dict.fromkeys(prompts, 1)
    assert frame[["clip_t", "clip_i", "dino"]].notna().all().all()
    names = sorted(evaluated[1])
    assert len(names) == 26 and names[:2] == ["p00_s0000.png", "p00_s0001.png"]  # +1 diversity image
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".eval")]


def test_metrics_agree_with_scores(run_dir, evaluated):
    metrics = evaluated[0]
    frame = pd.read_csv(run_dir / "eval" / "scores.csv")
    for key in ("clip_t", "clip_i", "dino"):
        assert metrics[key] == pytest.approx(frame[key].mean(), abs=1e-9)
    assert [p["prompt"] for p in metrics["per_prompt"]] == list(frame["prompt"])
    assert -1 <= metrics["dino_inter"] <= 1 and metrics["images_per_second"] > 0
    assert metrics["counts"] == {
        "prompts": 25,
        "images_per_prompt": 1,
        "scored_images": 25,
        "diversity_images": 2,
        "generated_images": 26,
        "reference_images": 3,
    }
    assert metrics["backbones"]["clip"].endswith("clip") and metrics["status"] == "completed"


def test_rerun_gives_identical_images_and_logs_to_wandb(run_dir, evaluated, shrink):
    evaluate_run(run_dir, {**shrink, "logger": "wandb"})  # offline W&B: a job_type=eval run beside training's
    again = {p.name: p.read_bytes() for p in sorted((run_dir / "eval" / "images").iterdir())}
    assert again == evaluated[1]
    assert list((run_dir / "wandb").glob("offline-run-*/files/media/table/eval/*.table.json"))


@pytest.mark.parametrize("damage", ["missing", "corrupt", "wrong-token"])
def test_bad_embedding_file_writes_nothing(run_dir, shrink, tmp_path, damage):
    copy = shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("eval", "wandb"))
    path = copy / "learned_embeds.safetensors"
    if damage == "missing":
        path.unlink()
    elif damage == "corrupt":
        path.write_bytes(path.read_bytes()[:40])
    else:
        save_file({"<cat2>": torch.zeros(1, 768)}, str(path))
    with pytest.raises(ZoodipError, match="learned_embeds.safetensors"):
        evaluate_run(copy, shrink)
    assert not [p.name for p in copy.iterdir() if "eval" in p.name]  # no eval/, no half-built .eval-*


def test_unknown_override_is_rejected(run_dir):
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    with pytest.raises(ZoodipError, match="eval.image_per_prompt"):
        prepare_config(cfg, {"eval.image_per_prompt": 1})
    assert prepare_config(cfg, {"eval": "quick"}).eval.num_inference_steps == 10


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ({"eval.images_per_prompt": 0}, "eval.images_per_prompt must be an integer >= 1, got 0"),
        ({"eval.diversity_images": -1}, "eval.diversity_images must be an integer >= 0, got -1"),
        ({"eval.kind": "clip"}, "eval.kind must be one of dreambooth, toyworld, got 'clip'"),
        ({"eval.clip.backend": "jax"}, "eval.clip.backend must be one of transformers, open_clip, got 'jax'"),
    ],
)
def test_a_bad_evaluation_setting_is_one_sentence_before_anything_is_written(run_dir, override, named):
    """The eval.* knobs are the schema's (the same check as training's), applied to the run's re-read config."""
    with pytest.raises(ZoodipError, match=re.escape(named)):
        evaluate_run(run_dir, {**override, "logger": "none"})


def test_preflight_checks_what_the_evaluation_needs(run_dir, shrink, tmp_path):
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    preflight(prepare_config(cfg, shrink))
    with pytest.raises(ZoodipError, match="eval.clip.path"):
        preflight(prepare_config(cfg, {**shrink, "eval.clip.path": str(tmp_path / "no-clip")}))
    with pytest.raises(ZoodipError, match="eval.living"):
        preflight(prepare_config(cfg, {**shrink, "data.subject": "my_mug"}))


def test_cli_bad_run_dir(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "zoodip.evaluation.evaluate", f"run_dir={tmp_path / 'nope'}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "is not a folder" in proc.stderr


def test_cli_needs_run_dir(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval.images_per_prompt=1"])
    assert exit_.value.code == 2 and "run_dir is required" in capsys.readouterr().err


def test_validator_uses_the_live_token(run_dir, tiny_dir):
    """The every-K validation: the trainer's quantized parts, its own VAE, CLIP-I of a few fixed-seed images."""
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    cfg = prepare_config(
        cfg, {"eval.clip.path": str(tiny_dir / "clip"), "eval.num_inference_steps": 2, "eval.validation.prompts": 1}
    )
    parts = load_components("tiny", "pretrained", str(tiny_dir), torch.float32, torch.device("cpu"), "int8")
    parts.release_vae()
    text = TextConditioner(parts, "<dog6>", "dog", 1)
    validate = Validator(cfg, parts, text)
    theta = text.initial_theta()
    first, moved, again = validate(theta), validate(theta + 0.5), validate(theta)
    assert set(first.metrics) == {"val/clip_i", "val/clip_t"} and len(first.images) == 2
    assert first.metrics == again.metrics and first.metrics != moved.metrics
    assert all(e.values is None for e in text.embeddings)


def test_training_with_eval_enabled_and_validation(tmp_path, tiny_dir, subject_dir, shrink):
    """`eval.enabled=true` evaluates at the end of training; `eval.every=K` validates every K steps (W&B)."""
    overrides = [f"{k}={v}" for k, v in shrink.items()]
    cfg = compose_train(
        "model.init=pretrained",
        f"model.path={tiny_dir}",
        f"data.path={subject_dir}",
        "data.subject=dog6",
        "train.steps=2",
        "eval.enabled=true",
        "eval.every=1",
        "logger=wandb",
        *overrides,
    )
    metrics = run(cfg, tmp_path / "run")
    assert metrics["status"] == "completed" and "eval_error" not in metrics
    assert set(metrics["eval"]) == {"clip_t", "clip_i", "dino", "dino_inter"}
    assert (tmp_path / "run" / "eval" / "metrics.json").is_file()
    offline = next((tmp_path / "run" / "wandb").glob("offline-run-*"))
    wandb_cli = [str(Path(sys.executable).with_name("wandb")), "leet", "inspect", "--json"]
    summary = subprocess.run([*wandb_cli, "--summary", str(offline)], capture_output=True, text=True, check=True)
    logged = json.loads(summary.stdout)["summary"]
    assert "val/clip_i" in logged and "eval/clip_i" in logged  # validation every step, evaluation at the end


def test_validation_vae_is_the_training_vae():
    """Validation during training rebuilds the released VAE of a random model: the same seeded weights."""
    model = ModelSettings("tiny", "random", None, seed=3, weights="int8")
    parts = load_components("tiny", "random", None, torch.float32, torch.device("cpu"), "int8", seed=3)
    assert same_weights(load_vae(model, torch.device("cpu"), torch.float32), parts.vae)
