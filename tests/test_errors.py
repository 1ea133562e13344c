"""Bad input: one clear sentence, exit code 2, no traceback; nothing half-written."""

from __future__ import annotations

import pytest
from conftest import compose_train, console
from PIL import Image

from zoodip.errors import ZoodipError
from zoodip.runtime.train import run


def rejects(tmp_path, *overrides: str, match: str) -> None:
    with pytest.raises(ZoodipError, match=match):
        run(compose_train(*overrides), tmp_path / "run")
    assert not (tmp_path / "run" / "learned_embeds.safetensors").exists()


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("puts.t_low=900", "t_low < t_high"),
        ("puts.t_low=-1", "t_low < t_high"),
        ("sg.tau=1", "sg.tau"),
        ("sg.nu=1.0", "sg.nu"),
        ("sg.nu=0", "sg.nu"),
        ("estimator.n=0", "estimator.n"),
        ("estimator.mu=0", "estimator.mu"),
        ("estimator.mu=-0.1", "estimator.mu"),
        ("train.cpu_memory=tiny", "train.cpu_memory must be one of lean, fast"),
        ("train.compile=fastest", "train.compile must be false or one of default, reduce-overhead"),
    ],
)
def test_invalid_hyperparameters(tmp_path, override, match):
    rejects(tmp_path, "data=planted", override, match=match)


def test_int4_weights_do_not_compile(tmp_path):
    rejects(tmp_path, "data=planted", "quantization=int4", "train.compile=default", match="quanto's INT4 layers")


def test_t_high_beyond_the_schedule(tmp_path):
    rejects(tmp_path, "data=planted", "puts.t_high=1001", match="beyond the model's 1000")


def test_data_folder_errors(tmp_path):
    rejects(tmp_path, "data.subject=null", match="data.path is not set")
    rejects(tmp_path, "data.subject=dog6", match="dataset/dog6' is not a folder")  # the default, dataset/<subject>
    rejects(tmp_path, f"data.path={tmp_path / 'nope'}", "data.subject=dog6", match="is not a folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    rejects(tmp_path, f"data.path={empty}", "data.subject=dog6", match="is empty")
    (empty / "notes.txt").write_text("not an image")
    (empty / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    rejects(tmp_path, f"data.path={empty}", "data.subject=dog6", match="no readable image")


def test_corrupt_files_are_skipped_when_others_remain(tmp_path, caplog):
    folder = tmp_path / "subject"
    folder.mkdir()
    Image.new("RGB", (64, 64), "red").save(folder / "00.png")
    (folder / "01.jpg").write_bytes(b"corrupt")
    metrics = run(compose_train(f"data.path={folder}", "data.subject=dog6", "train.steps=1"), tmp_path / "run")
    assert metrics["status"] == "completed"
    assert "skipping 01.jpg" in caplog.text


def test_token_errors(tmp_path, subject_dir):
    base = [f"data.path={subject_dir}", "data.subject=dog6"]
    rejects(tmp_path, *base, "data.placeholder_token=dog", match="already in the tokenizer")
    rejects(
        tmp_path,
        *base,
        "data.initializer_token='stuffed animal'",
        match="'stuffed animal' is 2 tokens .* exactly one: try data.initializer_token=dog or ",
    )


def test_a_multi_token_initializer_is_answered_with_words_of_that_tokenizer(tmp_path):
    """The toy world's tokenizer splits CLIP's 'dog': the error offers the world's own words, never 'dog'."""
    with pytest.raises(ZoodipError, match="'dog' is 3 tokens") as err:
        run(compose_train("model=toyworld", "data=planted", "data.initializer_token=dog"), tmp_path / "run")
    offered = str(err.value).split("try ", 1)[1]
    assert "data.initializer_token=object" in offered and "dog" not in offered  # the model's own word first


def test_a_folder_that_is_no_dreambooth_subject_starts_from_the_models_word(tmp_path, subject_dir, caplog):
    metrics = run(compose_train(f"data.path={subject_dir}", "data.subject=my_cat", "train.steps=1"), tmp_path / "run")
    assert metrics["status"] == "completed" and metrics["initializer_token"] == "dog"
    assert "the token starts from the model's word 'dog' (model.initializer_token)" in caplog.text


def test_missing_weights_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rejects(
        tmp_path,
        "data=planted",
        "model.init=pretrained",
        "model.path=someone/not-downloaded",
        match="not in the local Hugging Face cache",
    )
    rejects(tmp_path, "data=planted", "model.init=pretrained", f"model.path={tmp_path}", match="missing unet")


def test_device_and_dtype_errors(tmp_path):
    rejects(tmp_path, "data=planted", "train.device=tpu", match=r"train.device must be auto, cpu or cuda\[:N\]")
    if not __import__("torch").cuda.is_available():
        rejects(tmp_path, "data=planted", "train.device=cuda", match="train.device=cuda but no CUDA device")
        rejects(tmp_path, "data=planted", "model.dtype=fp16", match="fp16 cannot run on the CPU")


def test_backprop_needs_an_unquantized_model(tmp_path):
    rejects(tmp_path, "data=planted", "estimator=backprop", match="quantization=none")


def cli(monkeypatch, capfd, *args: str) -> tuple[int, str]:
    from zoodip.runtime.train import main

    return console(monkeypatch, capfd, main, "zoodip-train", *args)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["model=tiny", "logger=none", "no_such_key=1"], "no_such_key"),
        (["model=tiny", "logger=none", "estimator=nope"], "nope"),
        (["model=tiny", "logger=none", "data.subject=dog6", "data.path=/nonexistent"], "is not a folder"),
        (["model=tiny", "logger=none", "data=planted", "sg.tau=1"], "sg.tau"),
    ],
)
def test_cli_exits_2_with_one_clear_line(tmp_path, monkeypatch, capfd, args, match):
    monkeypatch.chdir(tmp_path)
    code, err = cli(monkeypatch, capfd, *args, f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2, err
    assert "Traceback" not in err
    assert match in err
