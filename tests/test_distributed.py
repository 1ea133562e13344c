"""train.distributed: one run over several processes (gloo on the CPU), exchanging only the step's losses.

The processes are started the two ways users start them: torchrun (its environment: RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT) and a SLURM job's tasks (SLURM_PROCID, SLURM_NTASKS, SLURM_JOB_NODELIST, as submitit's launcher leaves
them); each runs the real `zoodip-train` on the tiny model, and the token must be the single-process run's.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import compose_train
from safetensors.torch import load_file

from zoodip.errors import ZoodipError
from zoodip.runtime import distributed
from zoodip.runtime.distributed import Group, first_host
from zoodip.runtime.preemption import EXIT_PREEMPTED
from zoodip.schema import check_config

TINY = ["model=tiny", "data=planted", "logger=none", "train.progress=false", "eval.enabled=false", "sg.tau=4"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int, starter: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if starter == "torchrun":
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
        env["MASTER_PORT"] = str(port)
    else:  # a SLURM job with `world` tasks on one node
        env.update(SLURM_PROCID=str(rank), SLURM_NTASKS=str(world), SLURM_LOCALID=str(rank), SLURM_JOB_ID="77")
        env.update(SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(port))
    return env


def launch(run_dir: Path, world: int, overrides: list[str], starter: str = "torchrun") -> list[subprocess.Popen]:
    port = free_port()
    args = [*TINY, *overrides, f"hydra.run.dir={run_dir}"]
    if world > 1:
        args.append("train.distributed=true")
    return [
        subprocess.Popen(
            [sys.executable, "-m", "zoodip.runtime.train", *args],
            env=rank_env(rank, world, port, starter) if world > 1 else {**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(world)
    ]


def finish(procs: list[subprocess.Popen], timeout: float = 240) -> list[int]:
    codes = []
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        codes.append(p.returncode)
        if p.returncode not in (0, EXIT_PREEMPTED):
            print(err[-3000:], file=sys.stderr)
    return codes


def token(run_dir: Path) -> torch.Tensor:
    (value,) = load_file(run_dir / "learned_embeds.safetensors").values()
    return value


@pytest.mark.parametrize(
    ("world", "starter", "overrides"),
    [
        (2, "torchrun", ["estimator=rge", "sg=on"]),
        # three SLURM tasks sharing two cores: about 40 s, so kept out of make test (the rendezvous test below reads
        # SLURM's environment there)
        pytest.param(3, "slurm", ["estimator=spsa", "sg=off"], marks=pytest.mark.slow),
    ],
)
def test_k_processes_learn_the_single_process_token(tmp_path, world, starter, overrides):
    """Sequential forwards (estimator.batched=false) do the same arithmetic on every rank as in one process, so the
    token is bit-identical, with SG's buffer and Adam's state carried identically on every rank."""
    steps = [*overrides, "estimator.batched=false", "train.steps=8", "train.seed=3"]
    assert finish(launch(tmp_path / "one", 1, steps)) == [0]
    assert finish(launch(tmp_path / "many", world, steps, starter)) == [0] * world
    one, many = token(tmp_path / "one"), token(tmp_path / "many")
    assert torch.equal(one, many) and float(one.norm()) > 0
    metrics = json.loads((tmp_path / "many" / "metrics.json").read_text())
    single = json.loads((tmp_path / "one" / "metrics.json").read_text())
    # every rank counts the step's forward passes; only the losses (n + 1 for RGE, 2n for SPSA) and the stop flag
    # travel: one float per candidate, and one stop flag per step (checked before the first step, not after the last)
    per_step = single["forward_passes_per_step"]
    assert metrics["forward_passes"] == single["forward_passes"]
    shared = metrics["distributed"]
    assert shared["world_size"] == world and shared["floats_per_step"] == per_step + 1
    # rank 0 alone writes: one metrics.json, one references sheet at most, no second run's files
    assert sorted(p.name for p in (tmp_path / "many").iterdir() if p.suffix == ".json") == ["metrics.json"]


@pytest.mark.slow
def test_batched_forwards_on_k_processes_agree_to_float_rounding(tmp_path):
    """Batched forwards (the default): a rank's share is a smaller batch than one process's, so each loss may differ
    from the single-process one in float32's last bits; they agree within 1e-6 relative at every step (the token
    then drifts by Adam's amplification of those bits: BENCHMARKS.md, one run across several processes)."""
    import pandas as pd

    steps = ["estimator=spsa", "sg=off", "train.steps=8", "train.seed=3"]
    assert finish(launch(tmp_path / "one", 1, steps)) == [0]
    assert finish(launch(tmp_path / "many", 3, steps, "slurm")) == [0] * 3
    one, many = (pd.read_csv(tmp_path / d / "history.csv")["loss"] for d in ("one", "many"))
    assert ((one - many).abs() <= 1e-6 * one.abs()).all()


@pytest.mark.slow  # three launches of two processes, about a minute; each distributed step runs the stop flag fast
def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step_and_the_run_resumes_exactly(tmp_path):
    common = ["estimator=rge", "estimator.batched=false", "train.seed=1", "train.checkpoint_every=5"]
    steps = "train.steps=60"
    assert finish(launch(tmp_path / "straight", 1, [*common, steps])) == [0]
    procs = launch(tmp_path / "cut", 2, [*common, steps])
    deadline = time.monotonic() + 180
    while not (tmp_path / "cut" / "checkpoints").exists() and time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # the second rank only
    codes = finish(procs)
    assert codes == [EXIT_PREEMPTED] * 2, codes
    stopped = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert stopped["status"] == "preempted" and 5 <= stopped["checkpoint_step"] < 60
    assert finish(launch(tmp_path / "cut", 2, [*common, steps])) == [0, 0]
    assert torch.equal(token(tmp_path / "straight"), token(tmp_path / "cut"))


def test_a_distributed_run_of_one_process_is_one_sentence(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "zoodip.runtime.train", *TINY, "train.distributed=true", f"hydra.run.dir={tmp_path}"],
        env={k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "SLURM_NTASKS")},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "needs several processes: start them with torchrun" in result.stderr


def test_first_order_ti_refuses_the_knob():
    with pytest.raises(ZoodipError, match="first-order TI has one per step"):
        check_config(compose_train("experiments=ti", "train.distributed=true"))


def test_the_shares_cover_every_candidate_once():
    for m in range(1, 9):
        for world in range(1, 5):
            shares = [Group(rank=r, world=world).share(m) for r in range(world)]
            assert shares[0][0] == 0 and shares[-1][1] == m
            assert all(a[1] == b[0] for a, b in zip(shares, shares[1:], strict=False))
            assert max(b - a for a, b in shares) - min(b - a for a, b in shares) <= 1


def test_the_rendezvous_from_torchrun_or_slurm():
    assert distributed.environment({"WORLD_SIZE": "1"}) is None
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}
    assert distributed.environment(torchrun) == torchrun
    slurm = {"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "12345"}
    env = distributed.environment({**slurm, "SLURM_JOB_NODELIST": "gpu[03-05,07]"})
    assert env == {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "gpu03", "MASTER_PORT": "32345"}
    assert first_host("node1,node2") == "node1" and first_host("a-b[1-2]") == "a-b1" and first_host("x") == "x"


def test_when_rank_0_is_refused_before_training_every_rank_stops_in_one_sentence(tmp_path):
    """Rank 0 alone takes the run's lock; when another run holds it, rank 0 says so and the other rank, instead of
    waiting for losses that never come, stops naming rank 0's reason."""
    from zoodip.runtime.runlock import run_lock

    tmp_path.mkdir(exist_ok=True)
    with run_lock(tmp_path):
        procs = launch(tmp_path, 2, ["train.steps=2"])
        outputs = [p.communicate(timeout=240)[1] for p in procs]
    assert [p.returncode for p in procs] == [2, 2], outputs
    assert "is in use by another zoodip run" in outputs[0]
    assert "rank 0 stopped before training" in outputs[1]
