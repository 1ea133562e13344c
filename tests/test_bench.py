"""The benchmark harness on the tiny model: every method runs, every field is there, failures are contained."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from zoodip.errors import ZoodipError
from zoodip.models.quantize import quantize_weights
from zoodip.tools.bench import (
    BENCH_METHODS,
    CRASH_METHOD,
    FIELDS,
    check_methods,
    device_peak,
    markdown,
    ratio,
    run_time,
    weight_bytes,
    worker_failure,
)


@pytest.mark.slow  # heavy end to end: kept out of make test
def test_every_method_runs_and_a_crash_is_contained(tmp_path):
    methods = ["zoodip", CRASH_METHOD, *list(BENCH_METHODS)[1:]]  # the crash comes first: later methods still run
    cmd = [
        sys.executable,
        "-m",
        "zoodip.tools.bench",
        "model=tiny",
        f"bench.methods=[{','.join(methods)}]",
        "bench.steps=2",
        "bench.warmup=1",
        "bench.resolution=32",
        f"hydra.run.dir={tmp_path}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)  # zoodip_compile: ~1 min
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert set(report["machine"]) >= {"cpu", "cores", "gpu", "torch", "cuda"} and report["machine"]["cores"] >= 1
    results = {r["method"]: r for r in report["results"]}
    assert list(results) == methods
    assert all(set(FIELDS) <= set(r) for r in results.values())
    crash = results[CRASH_METHOD]
    assert crash["status"] == "failed" and "injected failure" in crash["error"] and crash["seconds_per_iter"] is None
    for name in BENCH_METHODS:
        r = results[name]
        assert r["status"] == "completed" and r["error"] is None, r
        assert r["peak_load_bytes"] > 0 and r["peak_train_bytes"] > 0 and r["seconds_per_iter"] > 0
        assert r["iters_per_second"] == pytest.approx(1 / r["seconds_per_iter"])
        assert set(r["weight_bytes"]) == {"text_encoder", "unet"} and min(r["weight_bytes"].values()) > 0
    fwd = {name: results[name]["forward_passes_per_iter"] for name in BENCH_METHODS}
    assert fwd == {
        "zoodip": 3,
        "zoodip_n1": 2,
        "zoodip_batched": 3,
        "zoodip_compile": 3,
        "zoodip_quanto": 3,
        "zoodip_fp32": 3,
        "zoodip_int4": 3,
        "zoodip_fp16": 3,
        "ti": 1,
        "dreambooth": 1,
    }
    assert all(r["warmup_seconds"] > 0 for r in results.values() if r["status"] == "completed")
    assert results["zoodip_compile"]["compile"] == "default" and results["zoodip"]["compile"] is None
    assert all(0 < results[name]["baseline_bytes"] <= results[name]["peak_load_bytes"] for name in BENCH_METHODS)
    assert results["zoodip_quanto"]["weight_bytes"] == results["zoodip"]["weight_bytes"]
    assert results["zoodip_fp32"]["dtype"] == "float32" and results["zoodip"]["dtype"] == "bfloat16"
    unet = {name: results[name]["weight_bytes"]["unet"] for name in BENCH_METHODS}
    assert unet["zoodip"] < 0.35 * unet["ti"] and unet["zoodip_int4"] < unet["zoodip"]
    assert results["zoodip"]["quantized_fraction"] > 0 and results["ti"]["quantized_fraction"] == 0
    assert results["zoodip_fp16"]["dtype"] == "bfloat16" and "bf16" in results["zoodip_fp16"]["note"]
    table = (tmp_path / "bench.md").read_text()
    assert f"| {CRASH_METHOD} | failed" in table and "| dreambooth | completed" in table
    assert table.count("fp16 has no fast CPU kernels") == 1 and "zoodip, zoodip_n1, zoodip_batched" in table
    assert "\\* zoodip_compile: torch.compile mode default, compiled during the" in table
    assert table.strip() in proc.stdout


def test_ratios_by_hand():
    assert ratio(6.0, 2.0) == 3.0 and ratio(None, 2.0) is None and ratio(1.0, 0) is None
    info = {"cpu": "x", "cores": 2, "gpu": None, "torch": "t", "cuda": None}
    base = {
        "status": "completed",
        "weights": "none",
        "dtype": "float32",
        "peak_load_bytes": 2**30,
        "forward_passes_per_iter": 1,
    }
    results = [
        {**base, "method": "zoodip", "peak_train_bytes": 2 * 2**30, "seconds_per_iter": 0.5, "iters_per_second": 2.0},
        {**base, "method": "ti", "peak_train_bytes": 8 * 2**30, "seconds_per_iter": 1.0, "iters_per_second": 1.0},
        {
            **base,
            "method": "dreambooth",
            "peak_train_bytes": 30 * 2**30,
            "seconds_per_iter": 0.25,
            "iters_per_second": 4.0,
        },
        {"method": "zoodip_int4", "status": "failed", "error": "Boom | with\na newline"},
    ]
    lines = markdown(results, info, "sd15", 512, 600).splitlines()
    assert "Full run: 600 iterations" in lines[2]
    row = next(line for line in lines if line.startswith("| zoodip |"))
    assert "| 5.0 min | 4.00x | 15.00x | 2.00x |" in row  # 600 x 0.5 s; TI/zoodip, DB/zoodip memory; speed
    assert run_time(0.02, 30_000) == "10.0 min" and run_time(0.5, 30_000) == "4.2 h"  # from 2 h on, in hours
    row = next(line for line in lines if line.startswith("| dreambooth |"))
    assert "| 0.27x | 1.00x | 4.00x |" in row
    failed_row = next(line for line in lines if line.startswith("| zoodip_int4 |"))
    assert failed_row.startswith("| zoodip_int4 | failed: Boom / with a newline |")
    assert failed_row.count("|") == row.count("|")  # a failed row has every column


def test_weight_bytes_count_quantized_storage():
    fp32 = torch.nn.Sequential(torch.nn.Linear(256, 512))
    assert weight_bytes(fp32) == (256 * 512 + 512) * 4
    int8 = torch.nn.Sequential(torch.nn.Linear(256, 512))
    quantize_weights(int8, "int8")
    assert weight_bytes(int8) == 256 * 512 + 512 * 4 + 512 * 4 + 2 * 4  # int8 data, scales, bias, io scales
    int4 = torch.nn.Sequential(torch.nn.Linear(256, 512))
    quantize_weights(int4, "int4")
    assert weight_bytes(int4) < weight_bytes(int8)


def test_a_killed_worker_is_named_by_its_signal():
    assert worker_failure(-9, "W1121 a warning\n") == "worker killed by SIGKILL (out of memory?)"
    assert worker_failure(-15, "") == "worker killed by SIGTERM"
    assert worker_failure(1, "Traceback\nImportError: no module\n") == "worker exited with 1: ImportError: no module"
    assert worker_failure(3, "") == "worker exited with 3: no output"


def test_unknown_method_is_rejected():
    check_methods(["zoodip", "ti", CRASH_METHOD])
    with pytest.raises(ZoodipError, match="unknown bench method"):
        check_methods(["zoodip", "nope"])


def test_cuda_figures_drive_the_memory_column():
    assert device_peak(used_now=3_000, reserved_now=1_000, max_reserved=2_500) == 4_500
    info = {"cpu": "x", "cores": 2, "gpu": "H100", "torch": "t", "cuda": "12"}
    base = {
        "status": "completed",
        "weights": "none",
        "dtype": "float16",
        "peak_load_bytes": 2**30,
        "peak_train_bytes": 2**30,
        "forward_passes_per_iter": 1,
        "seconds_per_iter": 1.0,
        "iters_per_second": 1.0,
    }
    results = [
        {**base, "method": "zoodip", "cuda_device_peak_bytes": 2**30},
        {**base, "method": "ti", "cuda_device_peak_bytes": 3 * 2**30},
    ]
    text = markdown(results, info, "sd15", 512, 30_000)
    assert "device-wide CUDA peak" in text and "GPU H100" in text
    assert "| 3.00x | — | 1.00x |" in next(x for x in text.splitlines() if x.startswith("| zoodip |"))


BAD_SETTINGS = [
    ("bench.cpu_memory=small", "bench.cpu_memory must be one of lean, fast"),
    ("bench.device=tpu", "bench.device must be auto, cpu or cuda[:N], got 'tpu'"),
    ("bench.steps=0", "bench.steps must be >= 1"),
    ("bench.warmup=-1", "bench.warmup >= 0"),
]
if not torch.cuda.is_available():  # checked before any worker starts, not reported as N failed methods
    BAD_SETTINGS.append(("bench.device=cuda", "bench.device=cuda but no CUDA device is available"))


@pytest.mark.parametrize(("setting", "message"), BAD_SETTINGS)
def test_bad_settings_are_usage_errors(tmp_path, setting, message):
    cmd = [sys.executable, "-m", "zoodip.tools.bench", "model=tiny", setting, f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and message in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "bench.json").exists()


@pytest.mark.slow  # times every kernel on the UNet's shapes: a benchmark's print, about 40 s
def test_kernel_tables_print(monkeypatch, capsys):
    """`python -m zoodip.tools.bench_kernels` on one small shape: both tables, one row per batch size and shape."""
    from zoodip.tools import bench_kernels

    monkeypatch.setattr(bench_kernels, "SHAPES", [(77, 256, 512)])
    bench_kernels.main(["--repeats", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert [c[:3] for c in cells] == [
        ["batch", "tokens", "in"],
        ["1", "77", "256"],
        ["3", "77", "256"],
        ["tokens", "in", "out"],
        ["77", "256", "512"],
    ]
    assert all(float(c) > 0 for c in cells[-1][3:6]) and cells[-1][6].endswith("x")


def test_default_methods_are_every_method():
    from hydra import compose, initialize_config_dir

    from zoodip import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="bench")
    assert list(cfg.bench.methods) == list(BENCH_METHODS)
