"""Fault injection on real `zoodip-train` processes (slow: each process pays the imports): SIGTERM, SIGINT and SIGUSR2
mid-run, kill -9, a second run on a live folder, and submitit's requeue. Every resumed run must end with the token of
an uninterrupted run, bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zoodip.runtime.preemption import EXIT_PREEMPTED
from zoodip.runtime.runlock import LOCK_FILE

pytestmark = pytest.mark.slow

RUN = [
    "model=tiny",
    "data=planted",
    "data.eval_points=2",
    "logger=none",
    "train.progress=false",
    "train.steps=40",
    "train.save_every=1",
    "train.checkpoint_every=0",
    "eval.enabled=false",
]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "zoodip.runtime.train", *RUN, *args]


def start(run_dir: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        command(f"hydra.run.dir={run_dir}", *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=run_dir.parent,
    )


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    """The exit code, and the console (Hydra logs to stdout, zoodip's own lines go to stderr)."""
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out + err


def wait_for(path: Path, process: subprocess.Popen | None = None, timeout: float = 120) -> None:
    """Until `path` exists (with save_every=1: the first step is done), or fail."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process is None or process.poll() is None, process.communicate()[1][-2000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def lock_holder(run_dir: Path) -> int:
    """The pid in the run folder's lock file, once the run holds it."""
    for _ in range(2400):
        text = (run_dir / LOCK_FILE).read_text() if (run_dir / LOCK_FILE).exists() else ""
        if text.startswith("pid "):
            return int(text.split()[1])
        time.sleep(0.05)
    raise AssertionError("the run never took its lock")


def token(run_dir: Path) -> torch.Tensor:
    return load_file(run_dir / "learned_embeds.safetensors")["<planted>"]


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> torch.Tensor:
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    code, err = finish(start(run_dir))
    assert code == 0, err[-2000:]
    return token(run_dir)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR2])
def test_a_signal_mid_run_exits_75_and_the_rerun_ends_identical(tmp_path, straight, signum):
    run_dir = tmp_path / "run"
    process = start(run_dir)
    wait_for(run_dir / "learned_embeds.safetensors", process)
    process.send_signal(signum)
    code, err = finish(process)
    assert code == EXIT_PREEMPTED, err[-2000:]
    stopped = metrics(run_dir)
    assert stopped["status"] == "preempted" and stopped["signal"] == signal.Signals(signum).name
    assert 1 <= stopped["checkpoint_step"] < 40 and "Traceback" not in err
    assert f"stopped by {signal.Signals(signum).name} after step {stopped['checkpoint_step']}" in err
    code, err = finish(start(run_dir))  # the same command again
    assert code == 0, err[-2000:]
    assert metrics(run_dir)["resumed_from_step"] == stopped["checkpoint_step"]
    assert torch.equal(token(run_dir), straight)


def test_kill_9_then_the_rerun_takes_the_stale_lock_and_ends_identical(tmp_path, straight):
    run_dir = tmp_path / "run"
    process = start(run_dir, "train.checkpoint_every=1")
    wait_for(run_dir / "checkpoints" / "last.json", process)
    time.sleep(0.5)
    process.kill()
    process.communicate()
    assert (run_dir / LOCK_FILE).read_text().startswith("pid ")  # left behind: a kill -9 cleans nothing up
    code, err = finish(start(run_dir, "train.checkpoint_every=1"))
    assert code == 0, err[-2000:]
    assert "taking over the lock" in err and "no longer running" in err
    assert metrics(run_dir)["resumed_from_step"] >= 1
    assert torch.equal(token(run_dir), straight)


def test_a_second_run_on_a_live_folder_exits_2(tmp_path):
    run_dir = tmp_path / "run"
    first = start(run_dir, "train.steps=100000")
    pid = lock_holder(run_dir)
    code, err = finish(start(run_dir, "train.steps=100000"))
    assert code == 2 and f"is in use by another zoodip run (pid {pid} on " in err and "Traceback" not in err
    first.send_signal(signal.SIGTERM)
    assert finish(first)[0] == EXIT_PREEMPTED


def test_submitit_requeues_a_preempted_job_which_resumes_identically(tmp_path, straight):
    """submitit's local executor behaves as on SLURM: SIGUSR2 calls the launcher's checkpoint, the job is requeued
    (the task exits 144 and is started again) and train.resume=auto continues it in its own job dir."""
    sweep_dir = tmp_path / "sweep"
    args = ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=20", f"hydra.sweep.dir={sweep_dir}"]
    multirun = [sys.executable, "-m", "zoodip.runtime.train", "-m", *RUN, *args]  # Hydra wants -m before the overrides
    launcher = subprocess.Popen(
        multirun, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=tmp_path
    )
    job = sweep_dir / "0"
    wait_for(job / "learned_embeds.safetensors", launcher, timeout=240)
    os.kill(lock_holder(job), signal.SIGUSR2)
    code, err = finish(launcher, timeout=600)
    assert code == 0, err[-3000:]
    logs = "".join(p.read_text() for p in sweep_dir.glob(".submitit/*/*.out"))
    assert "Requeued job" in logs, logs[-3000:]
    done = metrics(job)
    assert done["status"] == "completed" and 1 <= done["resumed_from_step"] < 40
    assert torch.equal(token(job), straight)
