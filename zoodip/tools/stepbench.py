"""zoodip-bench model=toyworld: one personalization step of the toy world against the floor of this CPU.

For each thread count it times, each in a fresh process:

* the ZOODiP preset's step (`experiments=toyworld`) three ways: one candidate at a time with the INT8 weights
  dequantized at every forward (`sequential`), the n + 1 candidates in one batched forward (`batched`), and the
  shipped default, batched with a dequantized copy kept per layer (`zoodip`); with `bench.compile`, also under
  `train.compile=default`;
* the first-order TI preset's step (`experiments=toyworld_ti`);
* `eval=toyworld` (70 images, 25 DDIM steps, guidance 5) of the initializer word's token;
* with `bench.baseline=DIR` (a checkout of another commit), its own ZOODiP and TI presets and its evaluation,
  composed and run by that checkout's code in the same benchmark run.

Then it counts the FLOPs of one ZOODiP step (torch.utils.flop_counter, plus the attention products, which the
counter does not see on the CPU) and times the floor: the step's own matrix products (every Linear, convolution
as its im2col GEMM, attention's two batched products) run back to back as plain torch.mm / torch.bmm. The step's
efficiency is floor time / step time.

The worker half of this file imports zoodip lazily and only through `setup` and `training_step` (and
`evaluate_toyworld`), so the same file times an older checkout when that checkout is first on PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SUBJECT = "orange_cross"
#: name -> (preset, extra overrides). `sequential` and `batched` switch off what the shipped preset turns on.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "sequential": ("toyworld", ["estimator.batched=false", "quantization.dequantized_copy=false"]),
    "batched": ("toyworld", ["estimator.batched=true", "quantization.dequantized_copy=false"]),
    "zoodip": ("toyworld", []),
    "compiled": ("toyworld", ["train.compile=default"]),
    "ti": ("toyworld_ti", []),
}


# ---------------------------------------------------------------- the worker (any checkout's zoodip)
def _module(path: str, flat: str):
    """zoodip's module `zoodip.<path>`, or `zoodip.<flat>` in a checkout from before the subpackage layout (a
    baseline of bench.step.baseline)."""
    import importlib

    try:
        return importlib.import_module(f"zoodip.{path}")
    except ModuleNotFoundError:
        return importlib.import_module(f"zoodip.{flat}")


def _compose(preset: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from zoodip import CONF_DIR

    base = [f"experiments={preset}", "logger=none", f"data.subject={SUBJECT}", "eval.every=0"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=[*base, *overrides])


def _setup(preset: str, overrides: list[str], run_dir: Path):
    import torch

    cfg = _compose(preset, overrides)
    _module("models.loading", "models").set_cpu_memory(cfg.train.cpu_memory)
    return cfg, _module("runtime.train", "train").setup(cfg, run_dir, torch.device("cpu"))


def _warmed_up_step(spec: dict[str, Any], run_dir: Path):
    """The preset's training step as a function of the step number, and the seconds of its `warmup` untimed steps."""
    import torch

    training_step = _module("runtime.train", "train").training_step
    cfg, s = _setup(spec["preset"], spec["overrides"], run_dir)
    generator = torch.Generator().manual_seed(0)
    quant = cfg.quantization.weights

    def step(i: int) -> None:
        training_step(s.method, s.objective, s.data, s.sampler, generator, i, quant)

    started = time.perf_counter()
    for i in range(1, spec["warmup"] + 1):
        step(i)
    return step, time.perf_counter() - started


def time_step(spec: dict[str, Any]) -> dict[str, Any]:
    """Median milliseconds of `steps` training steps of the preset, after `warmup` untimed ones."""
    with tempfile.TemporaryDirectory() as tmp:
        step, warmup = _warmed_up_step(spec, Path(tmp))
        times = []
        for i in range(spec["warmup"] + 1, spec["warmup"] + spec["steps"] + 1):
            start = time.perf_counter()
            step(i)
            times.append(time.perf_counter() - start)
    return {"ms": statistics.median(times) * 1e3, "warmup_s": warmup, "steps": len(times)}


def time_eval(spec: dict[str, Any]) -> dict[str, Any]:
    """Seconds of eval=toyworld (generation, scoring, files) for the initializer word's token."""
    import torch

    evaluate_toyworld = _module("evaluation.evaluate", "evaluate").evaluate_toyworld
    loading = _module("models.loading", "models")
    load_components, resolve_dtype = loading.load_components, loading.resolve_dtype

    cfg = _compose(spec["preset"], spec["overrides"])
    m = cfg.model
    parts = load_components(
        m.arch, m.init, m.path, resolve_dtype(m.dtype, torch.device("cpu")), torch.device("cpu"), "none"
    )
    tokenizer, table = parts.tokenizers[0], parts.text_encoders[0].get_input_embeddings().weight
    word = cfg.data.initializer_token or "star"
    rows = table[tokenizer(word, add_special_tokens=False).input_ids[:1]].detach().clone()
    del parts
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        metrics = evaluate_toyworld(Path(tmp), cfg, None, embeddings=[rows])
        seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "generation_seconds": metrics.get("generation_seconds"),
        "images": metrics["counts"]["generated_images"],
        "subject_accuracy": metrics.get("subject_accuracy"),
    }


def matrix_products(fn) -> list[tuple[int, int, int, int]]:
    """Every matrix product that `fn()` computes, as (batch, M, K, N): batch x (M, K) @ (K, N). A convolution counts
    as its im2col GEMM (per group), attention as its two batched products. Under inference mode the dispatcher
    hands linear, conv2d and attention over whole; elsewhere their decompositions (addmm, convolution, bmm)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    products: list[tuple[int, int, int, int]] = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            packet = func._overloadpacket
            if packet is aten.linear:
                x, w = args[0], args[1]
                products.append((1, x.numel() // x.shape[-1], w.shape[1], w.shape[0]))
            elif packet in (aten.mm, aten.addmm):
                a, b = (args[1], args[2]) if packet is aten.addmm else (args[0], args[1])
                products.append((1, a.shape[0], a.shape[1], b.shape[1]))
            elif packet in (aten.bmm, aten.baddbmm, aten.matmul):
                a, b = (args[1], args[2]) if packet is aten.baddbmm else (args[0], args[1])
                products.append((a.numel() // (a.shape[-2] * a.shape[-1]), a.shape[-2], a.shape[-1], b.shape[-1]))
            elif packet in (aten.conv2d, aten.convolution):
                w = args[1]
                groups = args[8] if packet is aten.convolution else (args[6] if len(args) > 6 else 1)
                cols = out.shape[0] * out.shape[2] * out.shape[3]
                products.append((groups, w.shape[0] // groups, w.shape[1] * w.shape[2] * w.shape[3], cols))
            elif packet in (aten.scaled_dot_product_attention, aten._scaled_dot_product_flash_attention_for_cpu):
                q, k = args[0], args[1]
                heads = q.numel() // (q.shape[-2] * q.shape[-1])
                products.append((heads, q.shape[-2], q.shape[-1], k.shape[-2]))  # Q K^T
                products.append((heads, q.shape[-2], k.shape[-2], q.shape[-1]))  # softmax(.) V
            return out

    with Recorder():
        fn()
    return products


def step_products(spec: dict[str, Any]) -> dict[str, Any]:
    """FLOPs of one step of the preset and the floor: its matrix products as plain torch.mm / torch.bmm."""
    from torch.utils.flop_counter import FlopCounterMode

    with tempfile.TemporaryDirectory() as tmp:
        step, _ = _warmed_up_step({**spec, "warmup": 1}, Path(tmp))
        counter = FlopCounterMode(display=False)
        with counter:
            step(2)
        products = matrix_products(lambda: step(3))
    product_flops = sum(2 * b * m * k * n for b, m, k, n in products)
    floor = floor_seconds(products, spec.get("repeats", 20))
    return {
        "counted_flops": counter.get_total_flops(),
        "product_flops": product_flops,
        "products": len(products),
        "floor_ms": floor * 1e3,
        "floor_gflops": product_flops / floor / 1e9,
    }


def floor_seconds(products: list[tuple[int, int, int, int]], repeats: int) -> float:
    """Median seconds of every product of the list run back to back as plain fp32 torch.mm / torch.bmm."""
    import torch

    operands = [
        (torch.randn(b, m, k), torch.randn(b, k, n)) if b > 1 else (torch.randn(m, k), torch.randn(k, n))
        for b, m, k, n in products
    ]
    outs = [torch.empty(a.shape[:-1] + b.shape[-1:]) for a, b in operands]

    def once() -> None:
        for (a, b), out in zip(operands, outs, strict=True):
            (torch.bmm if a.dim() == 3 else torch.mm)(a, b, out=out)

    with torch.inference_mode():
        once()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            once()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def profile_step(spec: dict[str, Any]) -> dict[str, Any]:
    """Where a step's time goes: torch.profiler's operators by self CPU time over `steps` steps, per step."""
    from torch.profiler import ProfilerActivity, profile

    with tempfile.TemporaryDirectory() as tmp:
        step, _ = _warmed_up_step(spec, Path(tmp))
        steps = spec["steps"]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for i in range(spec["warmup"] + 1, spec["warmup"] + steps + 1):
                step(i)
            wall = time.perf_counter() - start
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    ops = [
        {
            "op": e.key,
            "ms": e.self_cpu_time_total / 1e3 / steps,
            "share": e.self_cpu_time_total / total,
            "calls": e.count / steps,
        }
        for e in events[: spec.get("top", 12)]
    ]
    return {"ops": ops, "ms": wall / steps * 1e3, "ops_per_step": sum(e.count for e in events) / steps}


JOBS = {"step": time_step, "eval": time_eval, "products": step_products, "profile": profile_step}


def worker(spec_path: str, out_path: str) -> None:
    """Run one job of SPEC (JSON) with this process's zoodip, write its result (or its error) to OUT."""
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(int(spec["threads"]))
    try:
        result = {"status": "completed", **JOBS[spec["job"]](spec)}
    except Exception as err:  # reported, never raised: the parent carries on
        result = {"status": "failed", "error": f"{type(err).__name__}: {err}"}
    Path(out_path).write_text(json.dumps(result))


# ---------------------------------------------------------------- the parent
def run_job(spec: dict[str, Any], checkout: Path | None, timeout_s: float) -> dict[str, Any]:
    """One job in a fresh process with `spec['threads']` threads, importing zoodip from `checkout` (None: this one)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"])}
    if checkout is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(checkout), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        # run_path, not `python FILE`: the script's folder (zoodip/) must not shadow the standard library (io.py)
        code = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__worker__')['worker'](*sys.argv[2:])"
        cmd = [sys.executable, "-c", code, str(Path(__file__).resolve()), str(spec_path), str(out_path)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=tmp)
        except subprocess.TimeoutExpired:
            return {"status": "failed", "error": f"timed out after {timeout_s:.0f} s"}
        if out_path.is_file():
            return json.loads(out_path.read_text())
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"status": "failed", "error": f"worker exited with {proc.returncode}: {tail[0]}"}


def plan(
    variants: list[str],
    threads: list[int],
    baseline: Path | None,
    evaluate: bool,
    steps: int,
    warmup: int,
    profiled: tuple[str, ...] = (),
) -> list[tuple[str, dict[str, Any], Path | None]]:
    """(row label, job spec, checkout) for every measurement, thread count by thread count."""
    jobs = []
    for k in threads:
        step = {"job": "step", "threads": k, "steps": steps, "warmup": warmup}
        for name in variants:
            preset, overrides = VARIANTS[name]
            jobs.append((name, {**step, "preset": preset, "overrides": overrides}, None))
        if baseline is not None:
            jobs.append(("baseline zoodip", {**step, "preset": "toyworld", "overrides": []}, baseline))
            jobs.append(("baseline ti", {**step, "preset": "toyworld_ti", "overrides": []}, baseline))
        jobs.append(("floor", {"job": "products", "threads": k, "preset": "toyworld", "overrides": []}, None))
        if evaluate:
            jobs.append(("eval", {"job": "eval", "threads": k, "preset": "toyworld", "overrides": []}, None))
            if baseline is not None:
                jobs.append(
                    ("baseline eval", {"job": "eval", "threads": k, "preset": "toyworld", "overrides": []}, baseline)
                )
    # on one thread: the profiler's own cost is then the same share for every variant
    for name in profiled:
        preset, overrides = VARIANTS[name]
        spec = {"job": "profile", "threads": 1, "steps": min(steps, 20), "warmup": warmup}
        jobs.append((f"profile {name}", {**spec, "preset": preset, "overrides": overrides}, None))
    return jobs


def markdown(rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    """The step table (ms, it/s, GFLOP/s, share of the floor, speed-up over the baseline and over `sequential`)
    and the evaluation table, one block per thread count."""
    lines = [
        f"Machine: {info['cpu']}, {info['cores']} cores; torch {info['torch']}. Toy world, subject {SUBJECT}; "
        "each row a fresh process, median over the timed steps."
    ]
    for k in sorted({r["threads"] for r in rows}):
        mine = {r["label"]: r for r in rows if r["threads"] == k}
        floor = mine.get("floor", {})
        flops = floor.get("product_flops")
        seq = mine.get("sequential", {}).get("ms")
        lines += [
            "",
            f"**{k} thread{'s' if k > 1 else ''}.** One ZOODiP step: {fmt(flops and flops / 1e9, '.3f')} "
            f"GFLOP in {floor.get('products', '—')} matrix products (flop_counter alone: "
            f"{fmt(floor.get('counted_flops') and floor['counted_flops'] / 1e9, '.3f')} GFLOP); their floor as "
            f"plain torch.mm/bmm: {fmt(floor.get('floor_ms'), '.2f')} ms ({fmt(floor.get('floor_gflops'), '.1f')} "
            "GFLOP/s).",
            "",
            "| step | ms/step | it/s | GFLOP/s | % of floor | vs baseline | vs sequential |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, r in mine.items():
            if label in ("floor", "eval", "baseline eval") or label.startswith("profile"):
                continue
            if r.get("status") != "completed":
                lines.append(f"| {label} | failed: {' '.join(str(r.get('error')).split())[:160]} | | | | | |")
                continue
            ms = r["ms"]
            zo = not label.endswith("ti")
            lines.append(
                f"| {label} | {ms:.2f} | {1e3 / ms:.1f} | {fmt(flops / ms / 1e6 if flops and zo else None, '.1f')} | "
                f"{fmt(100 * floor['floor_ms'] / ms if floor.get('floor_ms') and zo else None, '.0f')} | "
                f"{fmt(_ratio(mine, label, 'baseline'), '.2f', 'x')} | "
                f"{fmt(seq / ms if seq and zo else None, '.2f', 'x')} |"
            )
        evals = [(label, mine[label]) for label in ("eval", "baseline eval") if label in mine]
        if evals:
            lines += ["", "| eval=toyworld | images | seconds | generation s | vs baseline |", "|---|---|---|---|---|"]
            be = mine.get("baseline eval", {}).get("seconds")
            for label, r in evals:
                if r.get("status") != "completed":
                    lines.append(f"| {label} | failed: {' '.join(str(r.get('error')).split())[:160]} | | | |")
                    continue
                lines.append(
                    f"| {label} | {r['images']} | {r['seconds']:.1f} | {fmt(r['generation_seconds'], '.1f')} "
                    f"| {fmt(be / r['seconds'] if be and label == 'eval' else None, '.2f', 'x')} |"
                )
    for r in rows:
        if not r["label"].startswith("profile") or r.get("status") != "completed":
            continue
        lines += [
            "",
            f"**Profile: {r['label'].removeprefix('profile ')}** (1 thread, torch.profiler, "
            f"{r['ms']:.1f} ms per step under the profiler, {r['ops_per_step']:.0f} operator calls per step)",
            "",
            "| operator | self ms/step | share | calls/step |",
            "|---|---|---|---|",
        ]
        lines += [f"| {o['op']} | {o['ms']:.2f} | {100 * o['share']:.1f}% | {o['calls']:.0f} |" for o in r["ops"]]
    return "\n".join(lines) + "\n"


def _ratio(mine: dict[str, dict[str, Any]], label: str, prefix: str) -> float | None:
    """The baseline's ms over this row's: `baseline zoodip` for ZOODiP rows, `baseline ti` for `ti`."""
    other = mine.get(f"{prefix} {'ti' if label.endswith('ti') else 'zoodip'}", {}).get("ms")
    ms = mine[label].get("ms")
    return other / ms if other and ms and not label.startswith(prefix) else None


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "—" if value is None else f"{format(value, spec)}{suffix}"
