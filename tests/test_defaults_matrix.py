"""Defaults that work in every combination: each model x data x method that the docs name trains two steps with
its defaults (nothing but the data folder where the data needs one), or is refused in one sentence that names a
working alternative. `make test` runs the cheap combinations, `make test-slow` the rest (see FAST and SLOW)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import compose_train
from safetensors.torch import load_file

from zoodip.errors import ZoodipError
from zoodip.runtime.train import run

#: The methods the docs' config tables and commands name: ZOODiP (RGE, the default), first-order TI, GF-TI.
METHODS = {"rge": (), "backprop": ("experiments=ti",), "gfti": ("method=gfti",)}
DATA = ("planted", "toyworld", "dreambooth")
#: Combinations refused by design, with the sentence's fix: none today. A new refusal goes here with its alternative.
REFUSED: dict[tuple[str, str, str], str] = {}


def combination(model: str, data: str, method: str, subject_dir) -> list[str]:
    folder = [f"data.path={subject_dir}"] if data == "dreambooth" else []  # the one thing a user must give
    return [f"model={model}", f"data={data}", *folder, *METHODS[method], "train.steps=2"]


def check(model: str, data: str, method: str, subject_dir, tmp_path) -> None:
    cfg = compose_train(*combination(model, data, method, subject_dir))
    if (model, data, method) in REFUSED:
        with pytest.raises(ZoodipError) as err:
            run(cfg, tmp_path / "run")
        message = str(err.value)
        assert "\n" not in message and REFUSED[(model, data, method)] in message
        return
    metrics = run(cfg, tmp_path / "run")
    assert metrics["status"] == "completed" and metrics["steps"] == 2 and metrics["method"] == method
    token = next(iter(load_file(tmp_path / "run" / "learned_embeds.safetensors").values()))
    assert token.shape[0] == 1 and bool(torch.isfinite(token).all())


#: The fast part (`make test`): the tiny model with ZOODiP on every data; first-order TI and GF-TI on the planted task.
FAST = [("tiny", data, "rge") for data in DATA] + [("tiny", "planted", "backprop"), ("tiny", "planted", "gfti")]
#: The rest (`make test-slow`): GF-TI's 30 candidates per step and its PCA of the whole embedding table, SDXL's two
#: text encoders and the toy world cost seconds each (measured 3 to 57 s a combination on the shared 2-core CPU).
SLOW = [(m, d, k) for m in ("tiny", "tiny_sdxl", "toyworld") for d in DATA for k in METHODS if (m, d, k) not in FAST]


@pytest.mark.parametrize(("model", "data", "method"), FAST)
def test_every_data_and_method_runs_with_the_defaults(model, data, method, subject_dir, tmp_path):
    check(model, data, method, subject_dir, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(("model", "data", "method"), SLOW)
def test_every_model_data_and_method_runs_with_the_defaults(model, data, method, subject_dir, tmp_path):
    check(model, data, method, subject_dir, tmp_path)


def test_the_matrix_is_every_combination():
    assert len(FAST) + len(SLOW) == 3 * len(DATA) * len(METHODS) and not set(FAST) & set(SLOW)


def train_cli(folder, *args: str) -> subprocess.CompletedProcess:
    folder.mkdir(parents=True)
    args = (*args, "train.steps=2", "logger=none", "train.progress=false", f"hydra.run.dir={folder}")
    return subprocess.run(
        [sys.executable, "-m", "zoodip.runtime.train", *args],
        capture_output=True,
        text=True,
        cwd=folder,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_the_toy_world_on_the_planted_task_from_the_command_line(tmp_path):
    """`zoodip-train model=toyworld data=planted` as a user types it: it trains from the world's own word."""
    result = train_cli(tmp_path / "run", "model=toyworld", "data=planted")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "completed 2 steps" in result.stderr


@pytest.mark.slow
def test_a_word_the_toy_world_splits_is_one_sentence_and_exit_code_2(tmp_path):
    """A word the world's tokenizer splits: exit code 2, one sentence offering the world's words, no traceback."""
    refused = train_cli(tmp_path / "run", "model=toyworld", "data=planted", "data.initializer_token=dog")
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode == 2 and "Traceback" not in refused.stderr and len(errors) == 1
    assert "try data.initializer_token=object" in errors[0]
