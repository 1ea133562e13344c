"""The toy world: generator, tokenizer, shipped model and scorer, its evaluation, and a personalization run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from zoodip import ROOT
from zoodip.errors import ZoodipError
from zoodip.toyworld import world as toyworld
from zoodip.toyworld.make import SHIPPED, acceptance_scenes, check, load_world_pipeline, make_toyworld

GOOD = "orange_cross"


def compose_toy(*overrides: str):
    """The real composition on the toy world (conftest's compose_train pins model=tiny)."""
    from zoodip import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=["logger=none", "train.progress=false", *overrides])


def test_generator_is_deterministic():
    a_images, a_scenes, a_captions = toyworld.sample_world(40, seed=3)
    b_images, b_scenes, b_captions = toyworld.sample_world(40, seed=3)
    c_images, _, _ = toyworld.sample_world(40, seed=4)
    assert np.array_equal(a_images, b_images) and a_scenes == b_scenes and a_captions == b_captions
    assert not np.array_equal(a_images, c_images)
    first, _ = toyworld.subject_images(GOOD)
    again, _ = toyworld.subject_images(GOOD)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(first, again, strict=True))


def test_shipped_subject_images_are_the_generator_output():
    images, captions = toyworld.subject_images(GOOD)
    table = json.loads((SHIPPED / "subjects" / "captions.json").read_text())
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        shipped = Image.open(SHIPPED / "subjects" / GOOD / f"{i:02d}.png")
        assert np.array_equal(np.asarray(shipped), np.asarray(image))
        assert table[GOOD][f"{i:02d}.png"] == caption


def test_every_caption_word_is_one_token_and_captions_leave_attributes_out():
    tokenizer = toyworld.world_tokenizer()
    assert len(tokenizer) < 700
    for word in toyworld.WORDS:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    _, scenes, captions = toyworld.sample_world(400, seed=0)
    for text in captions:
        assert len(tokenizer(text, add_special_tokens=False).input_ids) == len(text.split())
    assert any(any(g in c.split() for g in toyworld.GENERIC) for c in captions)
    assert any(not any(col in c.split() for col in toyworld.COLOURS) for c in captions)
    assert any("background" not in c for c in captions)
    for scene, text in zip(scenes, captions, strict=True):  # a caption never names a wrong attribute
        words = set(text.split())
        assert words & set(toyworld.SHAPES) <= {scene.shape}
        assert words & set(toyworld.COLOURS) <= {scene.colour, scene.background}


def test_subject_names_are_checked():
    assert toyworld.parse_subject("red_star") == toyworld.Scene("star", "red", "gray")
    for bad in ("star", "pink_star", "red_hexagon", ""):
        with pytest.raises(ZoodipError, match="not a toy-world subject"):
            toyworld.parse_subject(bad)


def test_scores_match_a_hand_count():
    """eval=toyworld's metrics on drawn images whose truth is known (the scorer reads clean drawings exactly)."""
    scorer = toyworld.load_scorer(SHIPPED / "scorer")
    rng = np.random.default_rng(11)
    scenes = [
        toyworld.Scene("cross", "orange", "blue"),  # subject right, background right
        toyworld.Scene("cross", "orange", "blue"),
        toyworld.Scene("cross", "orange", "gray"),  # subject right, background wrong (blue asked)
        toyworld.Scene("cross", "red", "blue"),  # colour wrong
        toyworld.Scene("star", "orange", "green"),  # shape wrong, background right
        toyworld.Scene("circle", "blue", "gray"),  # both wrong, no background asked
    ]
    asked = ["blue", "blue", "blue", "blue", "green", None]
    images = [toyworld.draw(s, rng) for s in scenes]
    refs, _ = toyworld.subject_images(GOOD)
    rows, metrics = toyworld.score_images(scorer, images, refs, GOOD, asked, [0, 1, 5])
    assert rows["shape"] == [s.shape for s in scenes]
    assert rows["colour"] == [s.colour for s in scenes]
    assert rows["background"] == [s.background for s in scenes]
    assert metrics["subject_accuracy"] == pytest.approx(3 / 6)
    assert metrics["shape_accuracy"] == pytest.approx(4 / 6)
    assert metrics["colour_accuracy"] == pytest.approx(4 / 6)
    assert metrics["prompt_accuracy"] == pytest.approx(4 / 5)
    assert rows["prompt_correct"] == [True, True, False, True, True, None]
    feats = scorer.judge(images)["features"]
    ref_feats = scorer.judge(refs)["features"]
    assert metrics["image_similarity"] == pytest.approx(float((feats @ ref_feats.T).mean()), abs=1e-6)
    trio = feats[[0, 1, 5]]
    pairs = [float(trio[i] @ trio[j]) for i in range(3) for j in range(3) if i < j]
    assert metrics["diversity"] == pytest.approx(1 - sum(pairs) / 3, abs=1e-5)


def test_shipped_world_loads_through_diffusers_and_takes_a_token():
    pipe = load_world_pipeline(SHIPPED)
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    assert width >= 256
    pipe.load_textual_inversion({"<mine>": torch.randn(1, width) * 0.01}, token="<mine>")
    out = pipe(
        "a photo of <mine>",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        height=32,
        width=32,
        output_type="np",
    ).images
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()
    size = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    assert size <= 30 * 2**20


# A reduced acceptance sample: every shape and colour once, on varied backgrounds.
REDUCED = [
    toyworld.Scene(s, c, b)
    for s, c, b in [
        ("circle", "red", "gray"),
        ("square", "green", "blue"),
        ("triangle", "blue", "yellow"),
        ("star", "yellow", "purple"),
        ("heart", "purple", "orange"),
        ("cross", "orange", "green"),
    ]
]


@pytest.mark.slow  # about a minute: the shipped world is fixed data, checked again whenever it is rebuilt
def test_shipped_world_follows_text_and_a_broken_one_does_not(tmp_path):
    result = check(SHIPPED, images=8, scenes=REDUCED, progress=False)
    follow, scorer = result["text_following"], result["scorer_on_reconstructions"]
    assert min(scorer.values()) >= 0.98
    assert follow["shape"] >= 0.8 and follow["colour"] >= 0.95 and follow["background"] >= 0.95

    pipe = load_world_pipeline(SHIPPED)  # broken: the words no longer mean anything
    table = pipe.text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        table.copy_(table[torch.randperm(len(table), generator=torch.Generator().manual_seed(0))])
    from zoodip.toyworld.make import text_following

    broken = text_following(pipe, toyworld.load_scorer(SHIPPED / "scorer"), REDUCED, 8, progress=False)
    assert broken["all"] < 0.5 and broken["shape"] < 0.8


def test_acceptance_covers_every_caption():
    scenes = acceptance_scenes()
    assert len(scenes) == 6 * 6 * 6 and all(s.background != s.colour for s in scenes)


@pytest.mark.slow  # a miniature build of every phase, 50-100 s: heavy end to end
def test_make_toyworld_writes_a_complete_world(tmp_path):
    """A minute-sized build (every phase, 1% of the steps) is a loadable diffusers folder with scorer and subjects."""
    info = make_toyworld(tmp_path / "world", seed=1, scale=0.01, progress=False)
    world = tmp_path / "world"
    assert (world / "model_index.json").is_file() and (world / "scorer" / "scorer.safetensors").is_file()
    assert len(list((world / "subjects").glob("*/0[0-4].png"))) == 36 * 5
    assert json.loads((world / "world.json").read_text())["token_width"] == 256 == info["token_width"]
    load_world_pipeline(world)
    with pytest.raises(ZoodipError, match="not an empty folder"):
        make_toyworld(world, scale=0.01, progress=False)


def test_bad_input_to_the_commands_exits_2(tmp_path, capfd):
    """zoodip-make-toyworld's console entry point, in this process: one sentence and exit code 2."""
    from zoodip.toyworld.make import main

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    for args in ([str(tmp_path / "full")], ["--check", str(tmp_path)], [str(tmp_path / "new"), "--minutes-scale", "0"]):
        capfd.readouterr()
        with pytest.raises(SystemExit) as exit_:
            main(args)
        err = capfd.readouterr().err
        assert exit_.value.code == 2 and err.startswith("error: ") and "Traceback" not in err, args


def test_toyworld_configs_compose():
    cfg = compose_toy("experiments=toyworld")
    assert cfg.model.arch == "toyworld" and cfg.data.subject == "red_circle" and cfg.eval.kind == "toyworld"
    assert cfg.data.path == str(SHIPPED / "subjects" / "red_circle") and cfg.data.template == "toyworld"
    assert (cfg.estimator.name, cfg.estimator.n, cfg.sg.tau, cfg.sg.nu) == ("rge", 2, 128, 1e-3)
    assert (cfg.puts.kind, cfg.puts.t_low, cfg.puts.t_high, cfg.quantization.weights) == ("puts", 500, 900, "int8")
    ti = compose_toy("experiments=toyworld_ti")
    assert ti.estimator.name == "backprop" and ti.quantization.weights == "none"
    own = compose_toy("model=toyworld", "data.path=/x", "data.subject=orange_cross")
    assert own.data.template == "toyworld"  # a plain folder on the toy world gets the world's templates


def test_personalization_raises_subject_accuracy_above_the_initializer(tmp_path):
    """A few hundred first-order TI steps on a good subject learn it; the initializer word does not draw it."""
    from zoodip.evaluation.evaluate import evaluate_toyworld, prepare_config
    from zoodip.runtime.train import run
    from zoodip.toyworld.demo import initializer_embedding

    cfg = compose_toy("experiments=toyworld_ti", "train.steps=300", "eval.enabled=false", "eval.images_per_prompt=4")
    metrics = run(cfg, tmp_path)
    assert metrics["status"] == "completed"
    ev = prepare_config(cfg)
    after = evaluate_toyworld(tmp_path, ev)
    (tmp_path / "init").mkdir()
    before = evaluate_toyworld(tmp_path / "init", ev, embeddings=[initializer_embedding(SHIPPED, "object")])
    assert after["subject_accuracy"] >= before["subject_accuracy"] + 0.3
    assert (tmp_path / "eval" / "metrics.json").is_file() and len(list((tmp_path / "eval" / "images").glob("*.png")))


@pytest.mark.slow
def test_a_retrained_world_passes_the_acceptance_figures(tmp_path):
    """`zoodip-make-toyworld` from scratch (about 30 minutes), then the full acceptance check."""
    make_toyworld(tmp_path / "world", seed=0, progress=False)
    result = check(tmp_path / "world", images=64, progress=False)
    follow, scorer = result["text_following"], result["scorer_on_reconstructions"]
    assert follow["shape"] >= 0.90 and follow["colour"] >= 0.99 and follow["background"] >= 0.99
    assert min(scorer.values()) >= 0.98


def test_demo_trains_evaluates_before_and_after_and_draws_the_picture(tmp_path, capsys):
    from zoodip.toyworld.demo import demo

    cfg = compose_toy("experiments=demo", "train.steps=20", "eval.images_per_prompt=5")
    result = demo(cfg, tmp_path)
    assert set(result) == {"before", "after"}
    for part in ("before", "after"):
        assert 0 <= result[part]["subject_accuracy"] <= 1
    picture = tmp_path / "demo.png"
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(picture) as im:
        assert im.size[0] >= 500 and im.size[1] >= 500
    err = capsys.readouterr().err
    assert "subject_accuracy  before" in err and str(picture) in err
    assert (tmp_path / "initializer" / "eval" / "metrics.json").is_file()


def test_validation_during_training_uses_the_scorer():
    """eval.every=K on the toy world: a few fixed-seed images of the live token, judged by the world's scorer."""
    from zoodip.evaluation.evaluate import Validator
    from zoodip.method.objective import TextConditioner
    from zoodip.models.loading import load_components

    cfg = compose_toy("experiments=toyworld", "eval.validation.images_per_prompt=2", "eval.num_inference_steps=3")
    parts = load_components("toyworld", "pretrained", str(SHIPPED), torch.float32, torch.device("cpu"), "int8")
    parts.release_vae()
    text = TextConditioner(parts, cfg.data.placeholder_token, "object", 1)
    validate = Validator(cfg, parts, text)
    theta = text.initial_theta()
    first, moved, again = validate(theta), validate(theta + 0.5), validate(theta)
    assert {"val/subject_accuracy", "val/prompt_accuracy", "val/image_similarity"} <= set(first.metrics)
    assert len(first.images) == 4 and first.metrics == again.metrics
    assert any(not np.array_equal(a, b) for a, b in zip(first.images, moved.images, strict=True))


def test_any_folder_of_images_trains_and_evaluates_on_the_toy_world(tmp_path):
    """data=dreambooth data.path=<folder>: the world's templates stand in for captions; eval reads the folder."""
    from zoodip.runtime.train import run

    folder = tmp_path / "mine"
    folder.mkdir()
    for i, image in enumerate(toyworld.subject_images("orange_cross", count=3, seed=5)[0]):
        image.save(folder / f"photo{i}.png")
    cfg = compose_toy(
        "experiments=toyworld",
        "data=dreambooth",
        f"data.path={folder}",
        "data.subject=orange_cross",
        "data.initializer_token=object",
        "train.steps=4",
        "eval.images_per_prompt=1",
    )
    assert cfg.data.template == "toyworld" and cfg.data.captions is None
    metrics = run(cfg, tmp_path / "run")
    assert metrics["status"] == "completed" and 0 <= metrics["eval"]["subject_accuracy"] <= 1
    assert json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())["counts"]["reference_images"] == 3


@pytest.mark.parametrize(
    "sweep", ["table3_sg_puts", "table4_tau_nu", "fig7_tl_tu", "tableS4_estimators", "tableS6_n", "tableS7_puts_ti"]
)
def test_the_paper_sweeps_compose_on_the_toy_world(sweep):
    preset = "toyworld_ti" if sweep == "tableS7_puts_ti" else "toyworld"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="train", overrides=[f"experiments={preset}", f"sweeps={sweep}"], return_hydra_config=True
        )
    assert cfg.model.arch == "toyworld" and cfg.eval.kind == "toyworld" and cfg.hydra.sweeper.params
