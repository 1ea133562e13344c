"""zoodip-generate: images of a learned token through diffusers' load_textual_inversion, from a run or a file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import console
from hydra import compose, initialize_config_dir
from PIL import Image
from safetensors.torch import save_file

from zoodip import CONF_DIR, ROOT
from zoodip.errors import ZoodipError
from zoodip.evaluation.generate import load_pipeline, prepare, run
from zoodip.models.embeddings import write_sdxl_file
from zoodip.toyworld import world as toyworld

PROMPT = 'prompt="a photo of <red_circle>"'
FAST = ["num_inference_steps=10", "guidance_scale=5"]


def zoodip(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd, env=env)


def compose_generate(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="generate", overrides=list(overrides))


def test_generates_scorable_images_from_a_toyworld_run(toy_run, tmp_path):
    out = tmp_path / "gen"
    result = zoodip(
        "zoodip.evaluation.generate",
        f"run_dir={toy_run}",
        PROMPT,
        "num_images=4",
        *FAST,
        f"hydra.run.dir={out}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    settings = json.loads((out / "generate.json").read_text())
    assert settings["prompt"] == "a photo of <red_circle>" and settings["token"] == "<red_circle>"
    assert settings["seeds"] == [0, 1, 2, 3] and settings["quantization"] == "int8"  # the run's own model
    assert settings["scheduler"] == "DDIMScheduler" and settings["num_inference_steps"] == 10
    assert sorted(p.name for p in out.iterdir()) == sorted([*settings["images"], "grid.png", "generate.json"])
    images = [Image.open(out / name).convert("RGB") for name in settings["images"]]
    assert all(im.size == (32, 32) for im in images)
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (4 * 128, 128)  # 32x32 images shown 4x larger
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen"]  # no staging folder left behind

    # the toy world's scorer reads every image (its accuracy after 50 steps is not asserted)
    scorer = toyworld.load_scorer(ROOT / "zoodip/assets/toyworld/scorer")
    refs = [
        Image.open(p).convert("RGB")
        for p in sorted((ROOT / "zoodip/assets/toyworld/subjects/red_circle").glob("*.png"))
    ]
    rows, scores = toyworld.score_images(scorer, images, refs, "red_circle", [None] * 4, [0, 1, 2, 3])
    assert len(rows["shape"]) == 4 and 0.0 <= scores["subject_accuracy"] <= 1.0
    assert scores["diversity"] is not None

    # image j is seed + j on its own generator: generating seed 2 alone gives image 02 again
    again = run(compose_generate(f"run_dir={toy_run}", PROMPT, "num_images=1", "seed=2", *FAST), tmp_path / "again")
    assert again["images"] == ["00_s0002.png"]
    assert Image.open(tmp_path / "again/00_s0002.png").tobytes() == images[2].tobytes()


def test_another_model_through_model_path(toy_run, tmp_path):
    world = ROOT / "zoodip/assets/toyworld"
    cfg = compose_generate(
        f"run_dir={toy_run}",
        f"model.path={world}",
        "quantization=none",
        "num_images=1",
        "num_inference_steps=2",
        "scheduler=euler",
    )
    settings = run(cfg, tmp_path / "out")
    assert settings["model"] == str(world) and settings["quantization"] == "none"
    assert settings["scheduler"] == "EulerDiscreteScheduler" and settings["prompt"] == "a photo of <red_circle>"


def test_sdxl_loads_both_tokens_from_one_a1111_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    clip_l, clip_g = torch.randn(1, 768, generator=g), torch.randn(1, 1280, generator=g)
    write_sdxl_file([clip_l, clip_g], tmp_path / "tok.safetensors")
    cfg = compose_generate(
        "model=tiny_sdxl",
        f"embedding={tmp_path / 'tok.safetensors'}",
        'token="<tok>"',
        "num_images=1",
        "num_inference_steps=2",
    )
    job = prepare(cfg)
    pipe = load_pipeline(job, torch.device("cpu"))
    for encoder, tokenizer, rows in (
        (pipe.text_encoder, pipe.tokenizer, clip_l),
        (pipe.text_encoder_2, pipe.tokenizer_2, clip_g),
    ):
        row = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("<tok>")]
        assert torch.equal(row.float(), rows[0])
    settings = run(cfg, tmp_path / "out")
    assert Image.open(tmp_path / "out" / settings["images"][0]).size == (64, 64)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["run_dir=/nonexistent/run"], "is not a folder"),
        (["model=toyworld"], "exactly one of run_dir"),
        (["embedding=x.safetensors"], "needs the model"),
        (["embedding=/nonexistent.safetensors", "model=toyworld"], "does not exist"),
        (["num_images=0", "embedding=x", "model=toyworld"], "num_images must be"),
    ],
)
def test_bad_input_is_one_sentence(overrides, message):
    with pytest.raises(ZoodipError, match=message):
        prepare(compose_generate(*overrides))


def test_prompt_without_token_and_bad_scheduler(toy_run):
    with pytest.raises(ZoodipError, match="does not contain the token <red_circle>"):
        prepare(compose_generate(f"run_dir={toy_run}", 'prompt="a photo of a circle"'))
    with pytest.raises(ZoodipError, match="scheduler='nope'"):
        prepare(compose_generate(f"run_dir={toy_run}", "scheduler=nope"))
    with pytest.raises(ZoodipError, match="1 text encoder"):
        save_file({"<t>": torch.zeros(1, 768)}, str(toy_run.parent / "sd.safetensors"))
        prepare(compose_generate(f"embedding={toy_run.parent / 'sd.safetensors'}", "model=tiny_sdxl"))


def generate_main(monkeypatch, capfd, *args: str) -> tuple[int, str]:
    from zoodip.evaluation.generate import main

    return console(monkeypatch, capfd, main, "zoodip-generate", *args)


def test_command_line_errors_exit_2_and_never_touch_user_files(toy_run, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    code, err = generate_main(monkeypatch, capfd, "run_dir=/nonexistent/run")
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: run_dir=")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    code, err = generate_main(monkeypatch, capfd, f"run_dir={toy_run}", "num_images=1", f"hydra.run.dir={mine}")
    assert code == 2 and "not an empty folder" in err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep"


def test_a_token_file_on_the_shipped_toy_world_prepares_its_model(toy_run):
    """embedding= with model=toyworld: the model group's interpolated path (${paths.toyworld_dir}) resolves."""
    job = prepare(compose_generate(f"embedding={toy_run / 'learned_embeds.safetensors'}", "model=toyworld"))
    assert job.token == "<red_circle>" and job.model.arch == "toyworld" and job.model.folder().is_dir()
    assert (job.model.weights, job.model.others, job.resolution) == ("none", "none", 32)
