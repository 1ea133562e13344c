"""Shared fixtures: compose the real configs and shrink them; tiny models written as local folders."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image

from zoodip import CONF_DIR

# Under pytest-xdist (`make test` runs two workers) each worker gets one torch thread: two processes with two
# threads each on two cores spin against each other and run many times slower (BENCHMARKS.md).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The smallest honest run: the built-in tiny model, no tracker, no progress bar, a few steps.
TINY = ["model=tiny", "logger=none", "train.progress=false", "train.steps=6", "sg.tau=4"]


def console(monkeypatch, capfd, main, name: str, *args: str) -> tuple[int, str]:
    """A console entry point run in this process, as its script would call it: (exit code, stderr)."""
    import sys

    monkeypatch.setattr(sys, "argv", [name, *args])
    capfd.readouterr()
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    return code, capfd.readouterr().err


def compose_train(*overrides: str) -> DictConfig:
    """The real `conf/train.yaml` composition, as `zoodip-train` would build it, with test overrides."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=[*TINY, *overrides])


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    """`zoodip-make-tiny` output: a diffusers folder loaded with model.init=pretrained model.path=DIR."""
    from zoodip.models.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def subject_dir(tmp_path_factory) -> Path:
    """A DreamBooth-style subject folder: three small random images."""
    folder = tmp_path_factory.mktemp("dataset") / "dog6"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        array = rng.integers(0, 255, size=(80, 96, 3), dtype=np.uint8)
        Image.fromarray(array).save(folder / f"{i:02d}.jpg")
    return folder


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Every tensor of the two modules' state dicts equal (quantized tensors compare their int data and scales)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory) -> Path:
    """A finished 50-step ZOODiP run on the toy world's red_circle (about 10 s), made by the real command line."""
    import subprocess
    import sys

    folder = tmp_path_factory.mktemp("toy") / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}
    args = [
        "experiments=toyworld",
        "data.subject=red_circle",
        "model.steps=50",
        "eval.enabled=false",
        "logger=none",
        "train.progress=false",
        f"hydra.run.dir={folder}",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "zoodip.runtime.train", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=folder.parent,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return folder
