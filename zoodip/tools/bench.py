"""zoodip-bench: peak training memory and speed of ZOODiP, first-order TI and DreamBooth, side by side.

Each method runs in its own fresh Python process (`python -m zoodip.tools.bench METHOD SPEC.json OUT.json`), so a
method's peak memory is its own and a crash loses nothing else. A step is one training iteration: sample a
latent, timestep and noise, estimate the gradient (or backpropagate), take an optimizer step.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from zoodip import CONF_DIR, ROOT
from zoodip.cli import hydra_app
from zoodip.errors import ZoodipError
from zoodip.io import atomic_write_text, write_json
from zoodip.models.loading import peak_rss_bytes


class Method(NamedTuple):
    """How a bench method loads the model and obtains the token's gradient."""

    weights: str  # int8 | int4 | none
    activations: str  # half: fp16 on CUDA (the paper's setting), bf16 on CPU (fp16 has no fast CPU kernels)
    gradient: str  # rge (ZOODiP) | backprop (first-order TI) | dreambooth (AdamW on the UNet)
    n: int = 2  # RGE perturbations per step
    batched: bool = False  # the n+1 evaluations as one batched forward
    fast_cpu_int8: bool = True  # zoodip's CPU INT8 kernels (False: quanto's own)
    compile: str | None = None  # torch.compile mode; "auto": reduce-overhead (CUDA graphs) on CUDA, default on CPU
    others: str | None = None  # weights of VAE and text encoder(s) (None: as `weights`)


#: First-order TI as training composes it (experiments=ti): its optimizer, no SG, uniform timesteps.
TI_TRAIN = ("optimizer=adamw", "sg=off", "puts=uniform")

BENCH_METHODS: dict[str, Method] = {
    "zoodip": Method("int8", "half", "rge"),
    "zoodip_n1": Method("int8", "half", "rge", n=1),
    "zoodip_batched": Method("int8", "half", "rge", batched=True),
    "zoodip_compile": Method("int8", "half", "rge", compile="auto"),  # as train.compile
    "zoodip_quanto": Method("int8", "half", "rge", fast_cpu_int8=False),  # quanto's CPU kernels, for comparison
    "zoodip_fp32": Method("int8", "fp32", "rge"),  # training's CPU default activations
    "zoodip_int4": Method("int4", "bf16", "rge", others="int8"),  # as quantization=int4: only the UNet INT4
    "zoodip_fp16": Method("none", "half", "rge"),  # unquantized, forward-only
    "ti": Method("none", "fp32", "backprop", n=1),
    "dreambooth": Method("none", "fp32", "dreambooth", n=1),
}


def train_config(arch: str, kind: str, n: int, batched: bool) -> DictConfig:
    """zoodip-train's own config for a bench method: the model's paper defaults (mu, lr, T_L, T_U), the
    estimator, SG and optimizer exactly as a training run composes them."""
    from hydra import compose, initialize_config_dir

    extra = [f"estimator={kind}", *TI_TRAIN] if kind == "backprop" else [f"estimator.n={n}"]
    overrides = [f"model={arch}", "logger=none", f"estimator.batched={str(batched).lower()}", *extra]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


class RandomLatents:
    """The bench's stand-in for reference images: a fresh random latent and one template per step."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def sample(self, generator: torch.Generator) -> tuple[torch.Tensor, str]:
        return torch.randn(self.shape, generator=generator), "a photo of {}"


#: Every result carries these keys (None where a failed method never measured them).
FIELDS = (
    "method",
    "status",
    "error",
    "peak_load_bytes",
    "peak_train_bytes",
    "seconds_per_iter",
    "iters_per_second",
    "forward_passes_per_iter",
    "warmup_seconds",
    "weight_bytes",
    "quantized_fraction",
    "weights",
    "dtype",
    "compile",
    "note",
    "baseline_bytes",
)
#: Test-only method that crashes inside the worker after it started (checks that a failure is contained).
CRASH_METHOD = "crash_for_test"


def check_methods(methods: list[str]) -> None:
    unknown = [m for m in methods if m not in BENCH_METHODS and m != CRASH_METHOD]
    if unknown:
        raise ZoodipError(f"unknown bench method(s) {', '.join(unknown)}; known: {', '.join(BENCH_METHODS)}")


def failed(method: str, error: str) -> dict[str, Any]:
    return {**dict.fromkeys(FIELDS), "method": method, "status": "failed", "error": error}


# ---------------------------------------------------------------- measuring, inside the worker process
def rss_high_water() -> int | None:
    """VmHWM (peak resident set) of this process in bytes; ru_maxrss where /proc is unavailable (not resettable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_rss_bytes()


def reset_rss_high_water() -> bool:
    """Writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def tensor_bytes(t: torch.Tensor) -> int:
    """Storage bytes of a tensor; quanto's quantized tensors (and their packed int4 data) count their inner
    tensors: integer data, scales, shifts. No copy is made (state_dict() could unpack)."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer the module holds, each shared tensor counted once."""
    return sum(tensor_bytes(t) for t in [*module.parameters(), *module.buffers()])


def device_peak(used_now: int, reserved_now: int, max_reserved: int) -> int:
    """Device-wide peak as nvidia-smi would have shown it: the use now (CUDA context and everything else on
    the device) with torch's current cache swapped for its peak cache."""
    return used_now - reserved_now + max_reserved


def measure(method: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Load the model as `method` trains it, then time `spec['steps']` training iterations."""
    if method == CRASH_METHOD:
        raise RuntimeError("crash_for_test: an injected failure")
    check_methods([method])
    from zoodip.method.methods import build_method
    from zoodip.method.objective import Objective, TextConditioner
    from zoodip.method.timesteps import TimestepSampler
    from zoodip.models.loading import load_components, resolve_device, resolve_dtype, set_cpu_memory
    from zoodip.models.quantize import quantized_fraction
    from zoodip.runtime.train import training_step
    from zoodip.schema import method_settings

    weights, act, kind, n, batched, fast, compile_mode, others = BENCH_METHODS[method]
    device = resolve_device(spec["device"], "bench.device")
    cuda = device.type == "cuda"
    note = None
    if act == "half":
        act = "fp16" if cuda else "bf16"
        note = None if cuda else "bf16 activations: fp16 has no fast CPU kernels"
    if compile_mode == "auto":
        compile_mode = "reduce-overhead" if cuda else "default"
    dtype = resolve_dtype(act, device)
    if not cuda:
        set_cpu_memory(spec["cpu_memory"], "bench.cpu_memory")
    baseline = rss_high_water()  # the interpreter, torch and the libraries: before any weight exists
    parts = load_components(
        spec["arch"], "random", None, dtype, device, weights, seed=spec["seed"], fast_cpu_int8=fast, others=others
    )
    text = TextConditioner(parts, "<bench>", "dog", 1)
    res = spec["resolution"]
    latent = (1, parts.unet.config.in_channels, res // 8, res // 8)
    parts.release_vae()  # training holds no VAE (reference latents are encoded once, before training)
    components = {f"text_encoder{'_' + str(i + 1) if i else ''}": e for i, e in enumerate(parts.text_encoders)}
    components["unet"] = parts.unet
    result: dict[str, Any] = {
        "weight_bytes": {name: weight_bytes(m) for name, m in components.items()},
        "quantized_fraction": quantized_fraction(list(components.values())),
        "dtype": str(dtype).removeprefix("torch."),
        "weights": weights,
        "note": note,
        "baseline_bytes": baseline,
        "compile": compile_mode,
    }
    if cuda:
        torch.cuda.synchronize(device)
        result["cuda_peak_load_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    result["peak_load_bytes"] = rss_high_water()
    result["rss_reset"] = reset_rss_high_water()

    objective = Objective(parts, text, batched=batched, max_batch=8, compile_mode=compile_mode)
    theta = torch.nn.Parameter(text.initial_theta())
    g = torch.Generator().manual_seed(spec["seed"])
    if kind == "dreambooth":  # not a token method (no registry entry): AdamW on the whole UNet, for Table 1
        parts.unet.requires_grad_(True).train()
        optimizer = torch.optim.AdamW(parts.unet.parameters(), lr=5e-6)

        def step(i: int) -> None:
            z0, noise = torch.randn(latent, generator=g), torch.randn(latent, generator=g)
            with torch.no_grad():
                objective.set_sample(z0, noise, int(torch.randint(0, 1000, (1,), generator=g)), "a photo of {}")
            objective.losses(theta.detach()[None]).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    else:  # exactly zoodip-train's step: the registry's method and train.training_step
        cfg = train_config(spec["arch"], kind, n, batched)
        method = build_method(method_settings(cfg), theta, [e.weight for e in text.embeddings], 1)
        sampler = TimestepSampler(cfg.puts.kind, cfg.puts.t_low, cfg.puts.t_high, parts.scheduler.alphas_cumprod)
        data = RandomLatents(latent)
        result["hyperparameters"] = {
            "mu": float(cfg.estimator.mu),
            "lr": float(cfg.optimizer.lr),
            "optimizer": cfg.optimizer.name,
            "puts": cfg.puts.kind,
        }

        def step(i: int) -> None:
            training_step(method, objective, data, sampler, g, i, weights)

    times = []
    for i in range(spec["warmup"] + spec["steps"]):
        passes_before = objective.forward_passes
        start = time.perf_counter()
        step(i + 1)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        result["forward_passes_per_iter"] = objective.forward_passes - passes_before
    warmup, timed = times[: spec["warmup"]], times[spec["warmup"] :]
    seconds = statistics.median(timed)
    result.update(
        seconds_per_iter=seconds,
        iters_per_second=1.0 / seconds,
        warmup_seconds=sum(warmup),
        peak_train_bytes=rss_high_water(),
    )
    if compile_mode:
        when = f"the {sum(warmup):.0f} s of warm-up" if warmup else "the first timed iteration"
        compiled = f"torch.compile mode {compile_mode}, compiled during {when}"
        result["note"] = f"{note}; {compiled}" if note else compiled
    if cuda:
        result["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        result["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        free, total = torch.cuda.mem_get_info(device)
        used = total - free  # what nvidia-smi shows now: CUDA context, other allocations and torch's cache
        result["cuda_device_used_bytes"] = used
        result["cuda_device_peak_bytes"] = device_peak(
            used, torch.cuda.memory_reserved(device), result["cuda_max_reserved_bytes"]
        )
        result["gpu"] = torch.cuda.get_device_name(device)
    return result


def worker(method: str, spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    torch.manual_seed(spec["seed"])
    try:
        result = {**dict.fromkeys(FIELDS), "method": method, "status": "completed", **measure(method, spec)}
    except Exception as err:  # reported, never raised: the parent carries on with the next method
        result = failed(method, f"{type(err).__name__}: {err}")
    atomic_write_text(out_path, json.dumps(result))


# ---------------------------------------------------------------- the parent: one process per method
def run_method(method: str, spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", "zoodip.tools.bench", method, str(spec_path), str(out_path)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return failed(method, f"timed out after {timeout_s:.0f} s")
        with contextlib.suppress(OSError, ValueError):
            return json.loads(out_path.read_text())
        return failed(method, worker_failure(proc.returncode, proc.stderr or proc.stdout))


def worker_failure(returncode: int, output: str) -> str:
    """Why a worker left no result: the signal that killed it (SIGKILL: most likely the kernel's OOM killer,
    whose victim prints nothing), else its exit status and last line of output."""
    if returncode < 0:
        name = signal.Signals(-returncode).name
        return f"worker killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    tail = output.strip().splitlines()[-1:] or ["no output"]
    return f"worker exited with {returncode}: {tail[0]}"


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator in (None, 0):
        return None
    return numerator / denominator


def machine(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The machine line. The GPU's name comes from the workers: the parent never touches CUDA, so no CUDA
    context of its own inflates the device-wide memory the workers measure."""
    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(x.split(":", 1)[1].strip() for x in lines if x.startswith("model name"))
    gpu = next((r["gpu"] for r in results if r.get("gpu")), None)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": gpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }


def run_time(seconds: float, steps: int) -> str:
    """A full training run of `steps` iterations at `seconds` per iteration, in minutes or hours."""
    minutes = seconds * steps / 60
    return f"{minutes:.1f} min" if minutes < 120 else f"{minutes / 60:.1f} h"


def markdown(results: list[dict[str, Any]], info: dict[str, Any], arch: str, resolution: int, run_steps: int) -> str:
    """The results as a table, with memory ratios against `ti` and `dreambooth`, speed against `ti`, and the
    time a full run of `run_steps` iterations would take at the measured speed."""
    by = {r["method"]: r for r in results if r["status"] == "completed"}
    mem = "cuda_device_peak_bytes" if any("cuda_device_peak_bytes" in r for r in by.values()) else "peak_train_bytes"
    ti, db = by.get("ti", {}), by.get("dreambooth", {})
    fmt = lambda x, spec: "—" if x is None else format(x, spec)  # noqa: E731
    times = lambda x: "—" if x is None else f"{x:.2f}x"  # noqa: E731
    lines = [
        f"Model: {arch} (random weights), {resolution} px, batch 1. Machine: {info['cpu']}, {info['cores']} cores, "
        f"GPU {info['gpu'] or 'none'}, torch {info['torch']}, CUDA {info['cuda'] or 'none'}.",
        f"Memory column: {'device-wide CUDA peak' if mem.startswith('cuda') else 'peak RSS during training steps'}; "
        "base: RSS of the interpreter and libraries before any weight is loaded (included in every peak).",
        f"Full run: {run_steps:,} iterations at the measured speed (training's logging and checkpoints excluded).",
        "",
        "| method | status | weights | act. | base GB | peak load GB | peak train GB | s/iter | it/s | fwd/iter | "
        "full run | TI / method mem | DB / method mem | speed vs TI |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r["status"] != "completed":
            error = " ".join(str(r["error"]).split()).replace("|", "/")[:200]
            lines.append(f"| {r['method']} | failed: {error} |" + " |" * 12)
            continue
        gb = lambda key, r=r: fmt(r.get(key) / 2**30 if r.get(key) is not None else None, ".2f")  # noqa: E731
        lines.append(
            f"| {r['method']} | completed | {r['weights']} | {r['dtype']}{'*' if r.get('note') else ''} | "
            f"{gb('baseline_bytes')} | {gb('peak_load_bytes')} | {gb(mem)} | "
            f"{r['seconds_per_iter']:.3f} | {r['iters_per_second']:.3g} | {r['forward_passes_per_iter']} | "
            f"{run_time(r['seconds_per_iter'], run_steps)} | "
            f"{times(ratio(ti.get(mem), r.get(mem)))} | {times(ratio(db.get(mem), r.get(mem)))} | "
            f"{times(ratio(r['iters_per_second'], ti.get('iters_per_second')))} |"
        )
    notes: dict[str, list[str]] = {}
    for r in results:
        for note in r["note"].split("; ") if r.get("note") else []:
            notes.setdefault(note, []).append(r["method"])
    lines += [f"\n\\* {', '.join(methods)}: {note}" for note, methods in notes.items()]
    return "\n".join(lines) + "\n"


def step_table(cfg: DictConfig, out: Path) -> None:
    """bench.table=step: the toy world's step and evaluation against this CPU's floor (zoodip/tools/stepbench.py)."""
    from zoodip.tools import stepbench

    st = cfg.bench.step
    unknown = [v for v in st.variants if v not in stepbench.VARIANTS]
    if cfg.model.arch != "toyworld":
        raise ZoodipError(f"bench.table=step times the toy world's presets: use model=toyworld, not {cfg.model.arch}")
    if unknown:
        raise ZoodipError(f"unknown bench.step.variants {', '.join(unknown)}; known: {', '.join(stepbench.VARIANTS)}")
    threads = list(st.threads)
    if not threads or not all(isinstance(k, int) and k >= 1 for k in threads):
        raise ZoodipError(f"bench.step.threads must be a list of thread counts >= 1, got {threads!r}")
    if not (isinstance(st.steps, int) and st.steps >= 1 and isinstance(st.warmup, int) and st.warmup >= 1):
        raise ZoodipError(f"bench.step.steps and bench.step.warmup must be >= 1, got {st.steps!r} and {st.warmup!r}")
    baseline = Path(st.baseline).expanduser().resolve() if st.baseline else None
    if baseline is not None and not (baseline / "zoodip" / "__init__.py").is_file():
        raise ZoodipError(f"bench.step.baseline={st.baseline!r} is not a zoodip checkout (no zoodip/__init__.py)")
    profiled = tuple(st.get("profile") or ())
    unknown = [v for v in profiled if v not in stepbench.VARIANTS]
    if unknown:
        raise ZoodipError(f"unknown bench.step.profile {', '.join(unknown)}; known: {', '.join(stepbench.VARIANTS)}")
    jobs = stepbench.plan(list(st.variants), threads, baseline, bool(st.eval), int(st.steps), int(st.warmup), profiled)
    rows: list[dict[str, Any]] = []
    for label, spec, checkout in jobs:
        print(f"zoodip-bench: {label}, {spec['threads']} thread(s) ...", file=sys.stderr, flush=True)
        rows.append(
            {
                "label": label,
                "threads": spec["threads"],
                "checkout": str(checkout or ROOT),
                **stepbench.run_job(spec, checkout, float(st.timeout_s)),
            }
        )
        info = machine([])
        write_json(
            out / "bench.json", {"machine": info, "table": "step", "baseline": str(baseline or ""), "rows": rows}
        )
    table = stepbench.markdown(rows, machine([]))
    atomic_write_text(out / "bench.md", table)
    print(table)
    print(f"zoodip-bench: {out / 'bench.json'}", file=sys.stderr)


def bench_task(cfg: DictConfig) -> None:
    b = cfg.bench
    out = Path(HydraConfig.get().runtime.output_dir)
    table = b.get("table", "auto")
    if table == "auto":
        table = "step" if cfg.model.arch == "toyworld" else "methods"
    if table not in ("methods", "step", "distributed"):
        raise ZoodipError(f"bench.table must be auto, methods, step or distributed, got {table!r}")
    if table == "distributed":
        from zoodip.tools import distbench

        rows = distbench.distributed_table(cfg)
        info = machine([])
        write_json(out / "bench.json", {"machine": info, "table": "distributed", "rows": rows})
        text = distbench.markdown(rows, f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}")
        atomic_write_text(out / "bench.md", text)
        print(text)
        print(f"zoodip-bench: {out / 'bench.json'}", file=sys.stderr)
        OmegaConf.save(cfg, out / "bench_config.yaml")
        return
    if table == "step":
        step_table(cfg, out)
        OmegaConf.save(cfg, out / "bench_config.yaml")
        return
    check_methods(list(b.methods))
    from zoodip.models.loading import check_cpu_memory, resolve_device

    resolve_device(b.device, "bench.device")
    check_cpu_memory(b.cpu_memory, "bench.cpu_memory")
    if not (isinstance(b.steps, int) and b.steps >= 1 and isinstance(b.warmup, int) and b.warmup >= 0):
        raise ZoodipError(f"bench.steps must be >= 1 and bench.warmup >= 0, got {b.steps!r} and {b.warmup!r}")
    resolution = int(b.resolution or cfg.model.resolution)
    spec = {
        "arch": cfg.model.arch,
        "device": b.device,
        "steps": int(b.steps),
        "warmup": int(b.warmup),
        "resolution": resolution,
        "seed": int(b.seed),
        "cpu_memory": b.cpu_memory,
        "run_steps": int(b.run_steps),
    }
    results: list[dict[str, Any]] = []
    for method in b.methods:
        print(f"zoodip-bench: {method} ...", file=sys.stderr, flush=True)
        results.append(run_method(method, spec, float(b.timeout_s)))
        info = machine(results)
        report = {"machine": info, "model": cfg.model.arch, "resolution": resolution, "spec": spec, "results": results}
        write_json(out / "bench.json", report)  # after every method: a crash later loses nothing
    table = markdown(results, machine(results), cfg.model.arch, resolution, spec["run_steps"])
    atomic_write_text(out / "bench.md", table)
    print(table)
    print(f"zoodip-bench: {out / 'bench.json'}", file=sys.stderr)
    OmegaConf.save(cfg, out / "bench_config.yaml")


hydra_main = hydra_app("bench", bench_task)


def main() -> None:
    if len(sys.argv) == 4 and not sys.argv[1].startswith("-") and "=" not in sys.argv[1]:
        worker(*sys.argv[1:4])  # python -m zoodip.tools.bench METHOD SPEC OUT (one method, in a fresh process)
        return
    hydra_main()


if __name__ == "__main__":
    main()
