"""zoodip-bench model=toyworld: the step table's FLOP count, floor, plan and table, and the command end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from zoodip.tools import stepbench


@pytest.mark.parametrize("inference", [True, False])
def test_matrix_products_count_linear_conv_and_attention_by_hand(inference):
    """Linear (5, 16) -> 32; conv 3 -> 8, 3x3, 5x5 output, batch 2, 2 groups...; attention over 10 x 12 tokens."""
    torch.manual_seed(0)
    lin, conv = torch.nn.Linear(16, 32), torch.nn.Conv2d(4, 8, 3, padding=1, groups=2)
    x, img = torch.randn(5, 16), torch.randn(2, 4, 5, 5)
    q, k, v = torch.randn(2, 4, 10, 8), torch.randn(2, 4, 12, 8), torch.randn(2, 4, 12, 8)

    def fn() -> None:
        lin(x)
        conv(img)
        F.scaled_dot_product_attention(q, k, v)

    with torch.inference_mode(inference), torch.no_grad():
        products = stepbench.matrix_products(fn)
    assert products == [(1, 5, 16, 32), (2, 4, 2 * 9, 2 * 25), (8, 10, 8, 12), (8, 10, 12, 8)]
    assert sum(2 * b * m * kk * n for b, m, kk, n in products) == 2 * (5 * 16 * 32 + 2 * 4 * 18 * 50 + 2 * 8 * 960)


def test_floor_times_the_products_as_plain_matmuls():
    seconds = stepbench.floor_seconds([(1, 64, 64, 64), (4, 8, 16, 8)], repeats=3)
    assert 0 < seconds < 1


def test_plan_and_table():
    jobs = stepbench.plan(["sequential", "zoodip", "ti"], [1, 2], None, evaluate=True, steps=3, warmup=1)
    labels = [(label, spec["threads"]) for label, spec, _ in jobs]
    assert labels == [(name, k) for k in (1, 2) for name in ("sequential", "zoodip", "ti", "floor", "eval")]
    assert all(checkout is None for *_, checkout in jobs)
    rows = [
        {"label": "sequential", "threads": 1, "status": "completed", "ms": 60.0},
        {"label": "zoodip", "threads": 1, "status": "completed", "ms": 20.0},
        {"label": "baseline zoodip", "threads": 1, "status": "completed", "ms": 50.0},
        {"label": "ti", "threads": 1, "status": "failed", "error": "RuntimeError: boom"},
        {
            "label": "floor",
            "threads": 1,
            "status": "completed",
            "product_flops": 1e9,
            "counted_flops": 9e8,
            "products": 10,
            "floor_ms": 10.0,
            "floor_gflops": 100.0,
        },
        {
            "label": "eval",
            "threads": 1,
            "status": "completed",
            "seconds": 10.0,
            "generation_seconds": 9.0,
            "images": 70,
        },
        {
            "label": "baseline eval",
            "threads": 1,
            "status": "completed",
            "seconds": 20.0,
            "generation_seconds": 19.0,
            "images": 70,
        },
    ]
    table = stepbench.markdown(rows, {"cpu": "test cpu", "cores": 2, "torch": "x"})
    assert "| zoodip | 20.00 | 50.0 | 50.0 | 50 | 2.50x | 3.00x |" in table  # 1 GFLOP in 20 ms; floor 10 of 20 ms
    assert "| ti | failed: RuntimeError: boom |" in table
    assert "| eval | 70 | 10.0 | 9.0 | 2.00x |" in table


def run_step_table(tmp_path, *settings: str) -> tuple[subprocess.CompletedProcess, dict]:
    every = ["threads=[1]", "steps=2", "warmup=1", "eval=false", "variants=[zoodip]", "profile=[]", *settings]
    cmd = [
        sys.executable,
        "-m",
        "zoodip.tools.bench",
        "model=toyworld",
        *[f"bench.step.{s}" for s in every],
        f"hydra.run.dir={tmp_path}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["label"]: r for r in report["rows"]}
    assert all(r["status"] == "completed" for r in rows.values()), rows
    return proc, rows


@pytest.mark.slow  # every row in a fresh process; the planning, the table and the errors are tested fast above
def test_the_step_table_end_to_end(tmp_path):
    """One thread, two steps: the step and the floor, each in a fresh process, into bench.json and the table."""
    proc, rows = run_step_table(tmp_path)
    assert set(rows) == {"zoodip", "floor"}
    assert rows["floor"]["product_flops"] > 0.5e9 and rows["floor"]["products"] > 100
    assert "| zoodip |" in proc.stdout and "% of floor" in proc.stdout


@pytest.mark.slow  # four more worker processes
def test_the_step_table_times_a_baseline_checkout_and_profiles(tmp_path):
    """A baseline checkout (here this one) is timed by its own code; the profile lists the step's operators."""
    from zoodip import ROOT

    proc, rows = run_step_table(tmp_path, "profile=[zoodip]", f"baseline={ROOT}")
    assert set(rows) == {"zoodip", "baseline zoodip", "baseline ti", "floor", "profile zoodip"}
    assert "**Profile: zoodip**" in proc.stdout
    assert any(o["op"] == "aten::addmm" for o in rows["profile zoodip"]["ops"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("model=tiny bench.table=step", "use model=toyworld"),
        ("bench.step.variants=[fast]", "unknown bench.step.variants fast"),
        ("bench.step.threads=[0]", "thread counts >= 1"),
        ("bench.step.profile=[fast]", "unknown bench.step.profile fast"),
        ("bench.step.baseline=/nonexistent", "is not a zoodip checkout"),
        ("bench.table=other", "bench.table must be"),
    ],
)
def test_bad_step_table_settings_are_one_sentence(tmp_path, override, message):
    model = [] if override.startswith("model=") else ["model=toyworld"]
    cmd = [sys.executable, "-m", "zoodip.tools.bench", *model, *override.split(), f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
