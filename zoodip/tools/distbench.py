"""zoodip-bench model=toyworld bench.table=distributed: one run's wall time per step on K processes against one.

Each row is a real `zoodip-train` run of the toy world's ZOODiP preset (bench.distributed.steps steps, no
evaluation, no checkpoints), started by torchrun (`python -m torch.distributed.run --standalone`) for K > 1 with
train.distributed=true, each process with bench.distributed.threads torch threads; K = 1 is the plain run. The time
per step is the training loop's own (metrics.json: iters_per_second, without the model's loading), and the row says
how many floats each process sent per step and how far its token is from the single process's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from safetensors.torch import load_file

from zoodip.errors import ZoodipError


def run_row(processes: int, threads: int, steps: int, overrides: list[str], folder: Path, timeout_s: float) -> dict:
    """One run on `processes` processes; its rank-0 metrics.json fields, or status=failed with the reason."""
    args = ["experiments=toyworld", "logger=none", "train.progress=false", "eval.enabled=false", "eval.every=0"]
    args += [f"model.steps={steps}", "train.checkpoint_every=0", "train.save_every=0", *overrides]
    args.append(f"hydra.run.dir={folder}")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if processes > 1:
        starter = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        cmd = [*starter, "-m", "zoodip.runtime.train", *args, "train.distributed=true"]
    else:
        cmd = [sys.executable, "-m", "zoodip.runtime.train", *args]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "error": f"timed out after {timeout_s:.0f} s"}
    metrics_path = folder / "metrics.json"
    if proc.returncode != 0 or not metrics_path.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"status": "failed", "error": f"exit code {proc.returncode}: {tail[0]}"}
    metrics = json.loads(metrics_path.read_text())
    shared = metrics.get("distributed") or {}
    (token,) = load_file(folder / "learned_embeds.safetensors").values()
    return {
        "status": "ok",
        "ms_per_step": 1e3 / metrics["iters_per_second"],
        "floats_per_step": shared.get("floats_per_step", 0.0),
        "collectives_per_step": shared.get("collectives_per_step", 0.0),
        "forward_passes_per_step": metrics["forward_passes_per_step"],
        "token": token.flatten().tolist(),
    }


def distributed_table(cfg: DictConfig) -> list[dict[str, Any]]:
    """The rows of bench.table=distributed, in the order of bench.distributed.processes (1 first: the reference)."""
    d = cfg.bench.distributed
    if cfg.model.arch != "toyworld":
        raise ZoodipError(
            f"bench.table=distributed times the toy world's preset: use model=toyworld, not {cfg.model.arch}"
        )
    processes = list(d.processes)
    if not processes or not all(isinstance(k, int) and k >= 1 for k in processes) or processes[0] != 1:
        raise ZoodipError(f"bench.distributed.processes must start with 1 (the reference), got {processes!r}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in processes:
            print(f"zoodip-bench: {k} process(es), {d.threads} thread(s) each ...", file=sys.stderr, flush=True)
            row = run_row(k, int(d.threads), int(d.steps), list(d.overrides), Path(tmp) / f"k{k}", float(d.timeout_s))
            rows.append({"processes": k, "threads": int(d.threads), **row})
    reference = rows[0]
    for row in rows:
        if row["status"] == "ok" and reference["status"] == "ok":
            row["speedup"] = reference["ms_per_step"] / row["ms_per_step"]
            diff = torch.tensor(row["token"]) - torch.tensor(reference["token"])
            row["token_max_abs_diff"] = float(diff.abs().max())
    for row in rows:
        row.pop("token", None)
    return rows


def markdown(rows: list[dict[str, Any]], machine: str) -> str:
    lines = [
        f"One run on K processes (toy world, ZOODiP preset), {machine}",
        "",
        "| processes | threads each | ms / step | speed-up | forwards / step | floats sent / step | token max diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['processes']} | {r['threads']} | failed: {r['error']} | | | | |")
            continue
        lines.append(
            f"| {r['processes']} | {r['threads']} | {r['ms_per_step']:.1f} | {r.get('speedup', float('nan')):.2f}x | "
            f"{r['forward_passes_per_step']:.0f} | {r['floats_per_step']:.2f} | {r.get('token_max_abs_diff', 0):.2g} |"
        )
    return "\n".join(lines) + "\n"
