"""zoodip-gpu-check: one command that proves the CUDA path and measures the GPU targets.

    python -m zoodip.gpu_check mode=quick  # smoke runs of zoodip-train + zoodip-generate on CUDA (<= 3 min)
    python -m zoodip.gpu_check mode=full   # + zoodip-eval on the toy world, zoodip-bench, the verdicts (<= 8 min)

Every part runs in its own processes (`python -m zoodip.runtime.train` etc., so no console script is needed) with a
timeout, and gpu-check.json / gpu-check.md are rewritten after every part: a crash, a hang or a killed command leaves
the report of what finished. Parts that cannot start inside the mode's time budget are reported as skipped. The parent
never creates a CUDA context of its own (the bench's device-wide peak would count it).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from zoodip import CONF_DIR, ROOT
from zoodip.cli import hydra_app
from zoodip.errors import ZoodipError
from zoodip.io import atomic_write_text, write_json

GB = 2**30  # as every table of BENCHMARKS.md


@dataclass(frozen=True)
class Mode:
    parts: tuple[str, ...]
    budget_s: float


MODES = {"quick": Mode(("smoke",), 170.0), "full": Mode(("smoke", "eval", "bench"), 470.0)}
PARTS = ("smoke", "eval", "bench")
MIN_START_S = 10.0  # a part is not started with less than this left of the budget

#: Smoke runs, most important first: zoodip-train overrides on top of SMOKE_COMMON.
SMOKE_RUNS: dict[str, tuple[str, ...]] = {
    "tiny": ("model=tiny",),
    "sd15_int8": ("model=sd15", "quantization=int8"),
    "sd15_int4": ("model=sd15", "quantization=int4"),
    "sd15_none": ("model=sd15", "quantization=none"),
    "sd15_batched": ("model=sd15", "estimator.batched=true"),
    "sd15_compile": ("model=sd15", "train.compile=reduce-overhead"),
    "sd15_spsa": ("model=sd15", "estimator=spsa"),
    "sd15_ti": ("model=sd15", "experiments=ti"),
    "sdxl_int8": ("model=sdxl", "quantization=int8"),
    "sd15_gfti": ("model=sd15", "method=gfti", "method.population=4", "method.intrinsic_dim=16"),
}
SMOKE_SUBJECT = ROOT / "zoodip" / "assets" / "toyworld" / "subjects" / "red_circle"
QUIET = (
    "logger=none",
    "eval.enabled=false",
    "eval.every=0",
    "train.progress=false",
    "train.save_every=0",
    "train.checkpoint_every=0",
    "train.resume=null",
)
SMOKE_COMMON = (
    "model.init=random",
    *QUIET,
    "data=dreambooth",
    f"data.path={SMOKE_SUBJECT}",
    "data.placeholder_token='<gpu-check>'",
    "data.initializer_token=dog",
)

#: The GPU targets (paper figures: 2.37 GB and 1.7x on an RTX 3090, 5 GB, 31 minutes).
SD15_PEAK_GB, SDXL_PEAK_GB, SPEED_RATIO, FULL_RUN_MINUTES = 1.6, 4.0, 3.0, 10.0
#: The ZOODiP n=2 INT8 bench methods whose fastest sets the speed verdicts.
FAST_VARIANTS = ("zoodip", "zoodip_batched", "zoodip_compile")


# ---------------------------------------------------------------- the settings
def check_device(name: str) -> str:
    """`name` (cuda, cuda:N or cpu) when usable; no CUDA device is one sentence (exit code 2)."""
    import torch

    if name != "cpu" and not (name == "cuda" or name.startswith("cuda:")):
        raise ZoodipError(f"device must be cuda, cuda:N or cpu (a harness check), got {name!r}")
    if name != "cpu" and not torch.cuda.is_available():
        raise ZoodipError(
            f"zoodip-gpu-check needs a CUDA device and torch {torch.__version__} sees none; run it on a GPU machine "
            "(docs/gpu.md)"
        )
    return name


def plan(cfg: DictConfig) -> tuple[tuple[str, ...], float]:
    """The parts to run and the time budget: the mode's unless `parts` / `budget_s` are given."""
    if cfg.mode not in MODES:
        raise ZoodipError(f"mode must be one of {', '.join(MODES)}, got {cfg.mode!r}")
    mode = MODES[cfg.mode]
    parts = tuple(cfg.parts) if cfg.parts is not None else mode.parts
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ZoodipError(f"parts must be among {', '.join(PARTS)}, got {', '.join(map(str, unknown))}")
    budget = float(cfg.budget_s) if cfg.budget_s is not None else mode.budget_s
    return parts, budget


def smoke_names(runs: list[str] | None) -> list[str]:
    names = list(SMOKE_RUNS) if runs is None else [str(r) for r in runs]
    unknown = [n for n in names if n not in SMOKE_RUNS]
    if unknown:
        raise ZoodipError(f"smoke.runs: unknown {', '.join(unknown)}; known: {', '.join(SMOKE_RUNS)}")
    return names


def bench_items(order: list[str]) -> list[tuple[str, str]]:
    """`arch/method` entries of bench.order as (arch, method), checked against conf/model and the bench's methods."""
    from zoodip.tools.bench import check_methods

    items = []
    for entry in order:
        arch, _, method = str(entry).partition("/")
        if not (CONF_DIR / "model" / f"{arch}.yaml").is_file() or not method:
            raise ZoodipError(f"bench.order entries are arch/method such as sd15/zoodip, got {entry!r}")
        items.append((arch, method))
    check_methods([m for _, m in items])
    return items


# ---------------------------------------------------------------- running a command
@dataclass
class Outcome:
    returncode: int | None  # None: killed at its timeout
    seconds: float
    tail: str  # the last lines of its output

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def child_env() -> dict[str, str]:
    """The children import zoodip from this checkout (an offline node may have no installed zoodip, only PYTHONPATH)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(ROOT) not in paths:
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *paths])
    return env


def run_command(cmd: list[str], timeout_s: float, log_path: Path) -> Outcome:
    """Run `cmd` in its own process group (a timeout kills it with its compile workers), output into `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log_path.open("w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=child_env(), start_new_session=True
        )
        try:
            code: int | None = proc.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    return Outcome(code, time.perf_counter() - start, tail(log_path))


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def module_command(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def failure(outcome: Outcome, what: str) -> str:
    if outcome.timed_out:
        return f"{what} timed out after {outcome.seconds:.0f} s"
    last = outcome.tail.strip().splitlines()[-1:] or ["no output"]
    return f"{what} exited with {outcome.returncode}: {last[0][:300]}"


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- the parts
def train_check(metrics: dict[str, Any] | None, device: str) -> str | None:
    """Why a finished training run fails the smoke check (None: it passes): completed, on the device, finite loss."""
    if metrics is None:
        return "no metrics.json"
    if metrics.get("status") != "completed":
        return f"status {metrics.get('status')}: {metrics.get('error')}"
    if not str(metrics.get("device", "")).startswith(device.split(":")[0]):
        return f"trained on {metrics.get('device')}, not {device}"
    loss = metrics.get("final_loss")
    if not isinstance(loss, int | float) or not math.isfinite(loss):
        return f"final loss {loss}"
    if metrics.get("nonfinite_steps"):
        return f"{metrics['nonfinite_steps']} steps had a non-finite loss"
    return None


def image_stats(folder: Path) -> dict[str, Any]:
    """The generated image's name and pixel spread: 0 means a uniform image (NaN decoded as black, say)."""
    import numpy as np
    from PIL import Image

    info = read_json(folder / "generate.json") or {}
    names = info.get("images") or []
    if not names:
        return {"image": None, "image_std": None, "image_device": info.get("device")}
    pixels = np.asarray(Image.open(folder / names[0]).convert("RGB"), dtype=np.float32)
    return {"image": str(folder / names[0]), "image_std": float(pixels.std()), "image_device": info.get("device")}


TRAIN_FIELDS = (
    "initial_loss",
    "final_loss",
    "iters_per_second",
    "peak_memory_bytes",
    "nonfinite_steps",
    "device",
    "dtype",
    "forward_passes_per_step",
    "weights_by_component",
    "wall_seconds",
)


def smoke(name: str, cfg: DictConfig, work: Path, device: str, timeout_s: float) -> dict[str, Any]:
    """One smoke run: a few zoodip-train steps on the device, then one zoodip-generate image of the learned token."""
    deadline = time.perf_counter() + timeout_s
    run_dir, image_dir = work / name / "run", work / name / "image"
    args = [
        *SMOKE_RUNS[name],
        *SMOKE_COMMON,
        f"train.device={device}",
        f"train.steps={int(cfg.smoke.steps)}",
        f"hydra.run.dir={run_dir}",
    ]
    trained = run_command(module_command("zoodip.runtime.train", *args), timeout_s, work / name / "train.log")
    metrics = read_json(run_dir / "metrics.json")
    result: dict[str, Any] = {
        "overrides": list(SMOKE_RUNS[name]),
        "train_seconds": trained.seconds,
        **{k: (metrics or {}).get(k) for k in TRAIN_FIELDS},
    }
    problem = failure(trained, "zoodip-train") if trained.returncode != 0 else train_check(metrics, device)
    if problem:
        return {**result, "status": "timeout" if trained.timed_out else "failed", "error": problem, "log": trained.tail}
    gen_args = [
        f"run_dir={run_dir}",
        "num_images=1",
        f"num_inference_steps={int(cfg.smoke.image_steps)}",
        f"device={device}",
        f"hydra.run.dir={image_dir}",
    ]
    generated = run_command(
        module_command("zoodip.evaluation.generate", *gen_args),
        deadline - time.perf_counter(),
        work / name / "generate.log",
    )
    result["generate_seconds"] = generated.seconds
    if generated.returncode != 0:
        status = "timeout" if generated.timed_out else "failed"
        return {**result, "status": status, "error": failure(generated, "zoodip-generate"), "log": generated.tail}
    result.update(image_stats(image_dir))
    if result["image"] is None:
        return {**result, "status": "failed", "error": "zoodip-generate wrote no image"}
    if not result["image_std"]:
        result["warning"] = "the image is uniform (NaN or overflow in the half-precision decode?)"
    return {**result, "status": "passed"}


def toy_eval(cfg: DictConfig, work: Path, device: str, timeout_s: float) -> dict[str, Any]:
    """A short ZOODiP run on the toy world, then zoodip-eval (eval=toyworld) of it on the device."""
    deadline = time.perf_counter() + timeout_s
    run_dir = work / "eval" / "run"
    args = [
        "experiments=toyworld",
        f"data.subject={cfg.eval.subject}",
        f"train.steps={int(cfg.eval.steps)}",
        *QUIET,
        f"train.device={device}",
        f"hydra.run.dir={run_dir}",
    ]
    trained = run_command(module_command("zoodip.runtime.train", *args), timeout_s, work / "eval" / "train.log")
    metrics = read_json(run_dir / "metrics.json")
    result: dict[str, Any] = {"train_seconds": trained.seconds, **{k: (metrics or {}).get(k) for k in TRAIN_FIELDS}}
    problem = failure(trained, "zoodip-train") if trained.returncode != 0 else train_check(metrics, device)
    if problem:
        return {**result, "status": "timeout" if trained.timed_out else "failed", "error": problem, "log": trained.tail}
    evaluated = run_command(
        module_command("zoodip.evaluation.evaluate", f"run_dir={run_dir}", "eval=toyworld", f"eval.device={device}"),
        deadline - time.perf_counter(),
        work / "eval" / "eval.log",
    )
    scores = read_json(run_dir / "eval" / "metrics.json")
    result["eval_seconds"] = evaluated.seconds
    if evaluated.returncode != 0 or scores is None:
        status = "timeout" if evaluated.timed_out else "failed"
        return {**result, "status": status, "error": failure(evaluated, "zoodip-eval"), "log": evaluated.tail}
    keep = ("subject_accuracy", "prompt_accuracy", "image_similarity", "diversity", "device", "seconds")
    return {**result, **{f"eval_{k}": scores.get(k) for k in keep}, "status": "passed"}


def bench_spec(arch: str, device: str, cfg: DictConfig) -> dict[str, Any]:
    """zoodip-bench's spec for one architecture at its own resolution, the paper's full run at its own steps."""
    model = OmegaConf.load(CONF_DIR / "model" / f"{arch}.yaml")
    b = cfg.bench
    return {
        "arch": arch,
        "device": device,
        "steps": int(b.steps),
        "warmup": int(b.warmup),
        "seed": 0,
        "resolution": int(model.resolution),
        "cpu_memory": "lean",
        "run_steps": int(model.steps),
    }


def bench_one(arch: str, method: str, cfg: DictConfig, device: str, timeout_s: float) -> dict[str, Any]:
    """One zoodip-bench method in its own process (zoodip.tools.bench.run_method), alone on the device."""
    from zoodip.tools.bench import run_method

    spec = bench_spec(arch, device, cfg)
    start = time.perf_counter()
    result = {
        **run_method(method, spec, timeout_s),
        "arch": arch,
        "resolution": spec["resolution"],
        "run_steps": spec["run_steps"],
        "wall_seconds": time.perf_counter() - start,
    }
    if result["status"] == "completed":
        return {**result, "status": "passed"}
    timed_out = str(result.get("error") or "").startswith("timed out")
    return {**result, "status": "timeout" if timed_out else "failed"}


# ---------------------------------------------------------------- verdicts
def gb(value: float | None) -> str:
    return "—" if value is None else f"{value / GB:.2f} GB"


def memory_breakdown(r: dict[str, Any]) -> dict[str, int] | None:
    """A bench result's device-wide peak split into what holds it: the CUDA context and libraries (what the device
    used beyond torch's cache), the weights, activations and workspaces (allocated beyond the weights), and
    torch's cache slack (reserved but never allocated)."""
    keys = ("cuda_device_peak_bytes", "cuda_max_reserved_bytes", "cuda_max_allocated_bytes")
    if any(r.get(k) is None for k in keys):
        return None
    weights = sum((r.get("weight_bytes") or {}).values())
    peak, reserved, allocated = (int(r[k]) for k in keys)
    return {
        "CUDA context": peak - reserved,
        "weights": weights,
        "activations": max(0, allocated - weights),
        "allocator cache": max(0, reserved - allocated),
    }


def memory_limit(r: dict[str, Any]) -> str | None:
    parts = memory_breakdown(r)
    if parts is None:
        return None
    largest = max(parts, key=parts.get)
    return f"largest: {largest}; " + ", ".join(f"{k} {gb(v)}" for k, v in parts.items())


def completed(results: list[dict[str, Any]], method: str) -> dict[str, Any] | None:
    return next((r for r in results if r.get("method") == method and r.get("seconds_per_iter") is not None), None)


def fastest(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    found = [r for m in FAST_VARIANTS if (r := completed(results, m)) is not None]
    return min(found, key=lambda r: r["seconds_per_iter"]) if found else None


def verdict(
    target: str,
    value: float | None,
    limit: float,
    measured: str,
    limited_by: str | None,
    higher_is_better: bool = False,
) -> dict[str, Any]:
    if value is None:
        return {
            "target": target,
            "status": "not measured",
            "value": None,
            "limit": limit,
            "measured": measured,
            "limited_by": None,
        }
    met = value >= limit if higher_is_better else value <= limit
    return {
        "target": target,
        "status": "met" if met else "missed",
        "value": value,
        "limit": limit,
        "measured": measured,
        "limited_by": None if met else limited_by,
    }


def peak_verdict(target: str, r: dict[str, Any] | None, limit_gb: float) -> dict[str, Any]:
    value = r.get("cuda_device_peak_bytes") if r else None
    if value is None:
        return verdict(target, None, limit_gb, "no completed CUDA measurement", None)
    measured = f"{value / GB:.2f} GB device-wide ({gb(r.get('cuda_max_allocated_bytes'))} max allocated)"
    return verdict(target, value / GB, limit_gb, measured, memory_limit(r))


def speed_verdict(results: list[dict[str, Any]]) -> dict[str, Any]:
    target = f"SD1.5 ZOODiP n=2 >= {SPEED_RATIO:g}x TI's it/s (paper 1.7x)"
    best, ti = fastest(results), completed(results, "ti")
    if best is None or ti is None:
        return verdict(target, None, SPEED_RATIO, "needs sd15/zoodip (or a variant) and sd15/ti", None, True)
    value = best["iters_per_second"] / ti["iters_per_second"]
    measured = f"{value:.2f}x ({best['method']} {best['iters_per_second']:.1f} it/s, TI {ti['iters_per_second']:.1f})"
    per_forward = best["seconds_per_iter"] / max(1, best.get("forward_passes_per_iter") or 1)
    limit = f"{best['forward_passes_per_iter']} forwards per iteration at {per_forward * 1e3:.1f} ms each"
    return verdict(target, value, SPEED_RATIO, measured, limit, True)


def run_time_verdict(results: list[dict[str, Any]]) -> dict[str, Any]:
    best = fastest(results)
    steps = int(best.get("run_steps") or 30_000) if best else 30_000
    target = f"SD1.5 {steps:,}-step run <= {FULL_RUN_MINUTES:g} min (paper 31 min on an RTX 3090)"
    if best is None:
        return verdict(target, None, FULL_RUN_MINUTES, "needs sd15/zoodip (or a variant)", None)
    minutes = best["seconds_per_iter"] * steps / 60
    measured = f"{minutes:.1f} min ({best['method']}, {best['seconds_per_iter'] * 1e3:.1f} ms/iter)"
    limit = f"{best['seconds_per_iter'] * 1e3:.1f} ms per iteration; <= {FULL_RUN_MINUTES * 60e3 / steps:.1f} needed"
    return verdict(target, minutes, FULL_RUN_MINUTES, measured, limit)


def verdicts(bench: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The four GPU targets from the bench results so far (GB = 2^30 bytes)."""
    sd15, sdxl = bench.get("sd15", []), bench.get("sdxl", [])
    sd15_target = f"SD1.5 INT8 device-wide peak <= {SD15_PEAK_GB:g} GB (paper 2.37 GB)"
    sdxl_target = f"SDXL INT8 device-wide peak <= {SDXL_PEAK_GB:g} GB (paper 5 GB)"
    return [
        peak_verdict(sd15_target, completed(sd15, "zoodip"), SD15_PEAK_GB),
        speed_verdict(sd15),
        peak_verdict(sdxl_target, completed(sdxl, "zoodip"), SDXL_PEAK_GB),
        run_time_verdict(sd15),
    ]


# ---------------------------------------------------------------- the report
def cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return " ".join(str(value).split()).replace("|", "/")[:160]


def table(rows: list[dict[str, Any]], columns: list[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]


class Report:
    """gpu-check.json and gpu-check.md, rewritten after every part (under a lock: smoke runs finish in parallel)."""

    def __init__(self, out_dir: Path, header: dict[str, Any], names: list[str]) -> None:
        self.out_dir, self.header = out_dir, header
        self.parts: dict[str, dict[str, Any]] = {n: {"name": n, "status": "pending"} for n in names}
        self.started = time.perf_counter()
        self.lock = threading.Lock()
        self.finished = False

    def record(self, name: str, result: dict[str, Any]) -> None:
        with self.lock:
            self.parts[name] = {"name": name, **result}
            self.write()
        elapsed = time.perf_counter() - self.started
        extra = result.get("error") or result.get("warning") or ""
        print(f"[{elapsed:5.0f} s] {name}: {result['status']} {extra}".rstrip(), flush=True)

    def bench(self) -> dict[str, list[dict[str, Any]]]:
        """The bench parts' results by architecture, with zoodip-bench's own status (completed / failed)."""
        out: dict[str, list[dict[str, Any]]] = {}
        for name, part in self.parts.items():
            if name.startswith("bench/") and "method" in part:
                status = "completed" if part["status"] == "passed" else "failed"
                out.setdefault(part["arch"], []).append({"error": None, **part, "status": status})
        return out

    def data(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for part in self.parts.values():
            counts[part["status"]] = counts.get(part["status"], 0) + 1
        return {
            **self.header,
            "finished": self.finished,
            "elapsed_s": time.perf_counter() - self.started,
            "counts": counts,
            "verdicts": verdicts(self.bench()),
            "parts": list(self.parts.values()),
        }

    def write(self) -> None:
        data = self.data()
        write_json(self.out_dir / "gpu-check.json", data)
        atomic_write_text(self.out_dir / "gpu-check.md", markdown(data, self.bench()))


def markdown(data: dict[str, Any], bench: dict[str, list[dict[str, Any]]]) -> str:
    from zoodip.tools.bench import machine
    from zoodip.tools.bench import markdown as bench_table

    state = "complete" if data["finished"] else "partial (still running, or stopped: see the pending parts)"
    lines = [
        f"# zoodip-gpu-check, mode {data['mode']}: {state}",
        "",
        f"GPU: {data.get('gpu') or '—'}; torch {data['torch']} (CUDA {data['cuda']}); {data['elapsed_s']:.0f} s "
        f"of a {data['budget_s']:.0f} s budget; parts: "
        + ", ".join(f"{v} {k}" for k, v in sorted(data["counts"].items())),
        "",
        "## Verdicts (GB = 2^30 bytes)",
        "",
    ]
    lines += table(data["verdicts"], ["target", "status", "measured", "limited_by"])
    groups = {
        "smoke": [
            "name",
            "status",
            "train_seconds",
            "final_loss",
            "iters_per_second",
            "peak_memory_bytes",
            "generate_seconds",
            "image_std",
            "error",
        ],
        "eval": [
            "name",
            "status",
            "train_seconds",
            "final_loss",
            "eval_seconds",
            "eval_subject_accuracy",
            "eval_image_similarity",
            "error",
        ],
        "bench": [
            "name",
            "status",
            "seconds_per_iter",
            "iters_per_second",
            "cuda_device_peak_bytes",
            "cuda_max_allocated_bytes",
            "warmup_seconds",
            "wall_seconds",
            "error",
        ],
    }
    for group, columns in groups.items():
        rows = [p for p in data["parts"] if p["name"].split("/")[0] == group]
        if rows:
            lines += ["", f"## {group}", "", *table(rows, columns)]
    for arch, results in bench.items():
        res, steps = results[0]["resolution"], results[0]["run_steps"]
        lines += ["", f"### zoodip-bench {arch}", "", bench_table(results, machine(results), arch, res, steps)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- running the parts
@dataclass
class Part:
    name: str
    run: Callable[[float], dict[str, Any]]  # timeout (s) -> result with `status`
    timeout_s: float


class Clock:
    def __init__(self, budget_s: float) -> None:
        self.deadline = time.perf_counter() + budget_s

    def left(self) -> float:
        return self.deadline - time.perf_counter()


def run_part(part: Part, report: Report, clock: Clock) -> None:
    left = clock.left()
    if left < MIN_START_S:
        report.record(part.name, {"status": "skipped", "error": f"out of time ({max(0.0, left):.0f} s of budget left)"})
        return
    start = time.perf_counter()
    try:
        result = part.run(min(part.timeout_s, left))
    except Exception as err:  # one part's crash is its own result, never the report's end
        result = {"status": "failed", "error": f"{type(err).__name__}: {err}"}
    report.record(part.name, {"seconds": time.perf_counter() - start, **result})


def execute(parts: list[Part], report: Report, clock: Clock, jobs: int = 1) -> None:
    if jobs <= 1:
        for part in parts:
            run_part(part, report, clock)
        return
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for part in parts:
            pool.submit(run_part, part, report, clock)


def machine_info(device: str) -> dict[str, Any]:
    """torch and the GPU as nvidia-smi names it (no CUDA context in this process)."""
    import torch

    gpu = None
    if device != "cpu":
        try:
            query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
            gpu = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            gpu = None
    return {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}


def build_parts(cfg: DictConfig, names: tuple[str, ...], work: Path, device: str) -> dict[str, list[Part]]:
    """Every part of the run, grouped: smoke runs (run `jobs` at a time), then the eval, then the bench (alone)."""
    groups: dict[str, list[Part]] = {}
    if "smoke" in names:
        groups["smoke"] = [
            Part(f"smoke/{n}", lambda t, n=n: smoke(n, cfg, work, device, t), float(cfg.smoke.timeout_s))
            for n in smoke_names(cfg.smoke.runs)
        ]
    if "eval" in names:
        groups["eval"] = [Part("eval/toyworld", lambda t: toy_eval(cfg, work, device, t), float(cfg.eval.timeout_s))]
    if "bench" in names:
        groups["bench"] = [
            Part(f"bench/{a}/{m}", lambda t, a=a, m=m: bench_one(a, m, cfg, device, t), float(cfg.bench.timeout_s))
            for a, m in bench_items(list(cfg.bench.order))
        ]
    return groups


def check(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Run the check; returns the final report's data."""
    names, budget = plan(cfg)
    device = check_device(str(cfg.device))
    work = Path(cfg.work_dir) if cfg.work_dir else out_dir / "work"
    groups = build_parts(cfg, names, work, device)
    header = {"mode": cfg.mode, "device": device, "budget_s": budget, "work_dir": str(work), **machine_info(device)}
    report = Report(out_dir, header, [p.name for parts in groups.values() for p in parts])
    report.write()
    clock = Clock(budget)
    print(f"zoodip-gpu-check: mode {cfg.mode}, {budget:.0f} s, report in {out_dir}", flush=True)
    for group, parts in groups.items():
        execute(parts, report, clock, int(cfg.jobs) if group == "smoke" else 1)
    report.finished = True
    report.write()
    return report.data()


def task(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    out_dir = Path(cfg.out_dir or HydraConfig.get().runtime.output_dir).expanduser()
    data = check(cfg, out_dir)
    for v in data["verdicts"]:
        print(f"{v['status']:>12}: {v['target']}: {v['measured']}", flush=True)
    print(f"zoodip-gpu-check: {out_dir / 'gpu-check.md'}", flush=True)


main = hydra_app("gpu_check", task)

if __name__ == "__main__":
    main()
