"""zoodip-gpu-check on a CPU: the no-device error, the report written after every part, timeouts and the budget,
the verdict arithmetic; and the training step's device discipline, checked on PyTorch's meta device (any host
read-back or CPU tensor mixed in fails there, as it would stall or fail on CUDA)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from zoodip import ROOT
from zoodip.errors import ZoodipError
from zoodip.tools.gpu_check import (
    GB,
    Clock,
    Part,
    Report,
    bench_items,
    child_env,
    execute,
    memory_breakdown,
    plan,
    run_command,
    smoke_names,
    train_check,
    verdicts,
)


def test_no_cuda_device_is_one_sentence_and_exit_code_2(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    cmd = [
        sys.executable,
        "-m",
        "zoodip.tools.gpu_check",
        "mode=quick",
        f"out_dir={tmp_path / 'out'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: zoodip-gpu-check needs a CUDA device"), proc.stderr
    assert not (tmp_path / "out").exists()


def test_modes_parts_and_names_are_checked():
    cfg = lambda **kw: OmegaConf.create({"mode": "quick", "parts": None, "budget_s": None, **kw})  # noqa: E731
    assert plan(cfg()) == (("smoke",), 170.0)
    assert plan(cfg(mode="full")) == (("smoke", "eval", "bench"), 470.0)
    assert plan(cfg(parts=["bench"], budget_s=300)) == (("bench",), 300.0)
    for bad in (cfg(mode="fast"), cfg(parts=["smoke", "benchmark"])):
        with pytest.raises(ZoodipError):
            plan(bad)
    assert smoke_names(None)[:2] == ["tiny", "sd15_int8"]
    with pytest.raises(ZoodipError, match="unknown sd15_int3"):
        smoke_names(["sd15_int3"])
    assert bench_items(["sd15/zoodip", "sdxl/ti"]) == [("sd15", "zoodip"), ("sdxl", "ti")]
    for bad in (["sd15"], ["sd99/zoodip"], ["sd15/zoodip_int2"]):
        with pytest.raises(ZoodipError):
            bench_items(bad)


def read(out: Path) -> dict:
    return json.loads((out / "gpu-check.json").read_text())


def header() -> dict:
    return {"mode": "quick", "device": "cpu", "budget_s": 60.0, "gpu": None, "torch": "x", "cuda": None}


def test_the_report_is_written_after_every_part(tmp_path):
    seen: list[list[str]] = []

    def part(name: str) -> Part:
        def run(timeout_s: float) -> dict:
            seen.append([p["status"] for p in read(tmp_path)["parts"]])  # the report as this part starts
            return {"status": "passed", "final_loss": 0.5}

        return Part(name, run, 30.0)

    names = ["smoke/a", "smoke/b", "eval/toyworld"]
    report = Report(tmp_path, header(), names)
    report.write()
    execute([part(n) for n in names], report, Clock(60.0))
    assert seen == [["pending"] * 3, ["passed", "pending", "pending"], ["passed", "passed", "pending"]]
    data = read(tmp_path)
    assert data["finished"] is False and data["counts"] == {"passed": 3}
    assert [p["name"] for p in data["parts"]] == names and all(p["seconds"] >= 0 for p in data["parts"])
    assert {v["status"] for v in data["verdicts"]} == {"not measured"} and len(data["verdicts"]) == 4
    md = (tmp_path / "gpu-check.md").read_text()
    assert "partial" in md and "| smoke/b | passed |" in md and "## eval" in md


def test_timeouts_crashes_and_the_budget_leave_a_partial_report(tmp_path, monkeypatch):
    monkeypatch.setattr("zoodip.tools.gpu_check.MIN_START_S", 2.0)
    script = (
        "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        "print('started', flush=True); time.sleep(60)"
    )

    def hang(timeout_s: float) -> dict:
        outcome = run_command([sys.executable, "-c", script], timeout_s, tmp_path / "hang.log")
        return {"status": "timeout" if outcome.timed_out else "passed", "tail": outcome.tail}

    def crash(timeout_s: float) -> dict:
        raise RuntimeError("CUDA error: an injected failure")

    def slow(timeout_s: float) -> dict:
        time.sleep(0.5)
        return {"status": "passed"}

    parts = [
        Part("smoke/crash", crash, 5.0),
        Part("smoke/slow", slow, 5.0),
        Part("smoke/hang", hang, 1.5),
        Part("bench/sd15/zoodip", slow, 5.0),
    ]
    report = Report(tmp_path, header(), [p.name for p in parts])
    execute(parts, report, Clock(3.9))  # the slow part and the hang take 2 s: under 2 s left, the bench is skipped
    status = {p["name"]: p for p in read(tmp_path)["parts"]}
    assert status["smoke/hang"]["status"] == "timeout" and "started" in status["smoke/hang"]["tail"]
    assert status["smoke/crash"]["status"] == "failed" and "injected failure" in status["smoke/crash"]["error"]
    assert status["smoke/slow"]["status"] == "passed"
    assert status["bench/sd15/zoodip"]["status"] == "skipped" and "out of time" in status["bench/sd15/zoodip"]["error"]
    leftover = subprocess.run(["pgrep", "-f", "time.sleep\\(60\\)"], capture_output=True, text=True).stdout
    assert not leftover.strip(), "the timed-out command's own children must be killed with it"


def test_children_import_zoodip_from_this_checkout(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/tmp/site")
    env = child_env()
    assert env["PYTHONPATH"].split(os.pathsep) == [str(ROOT), "/tmp/site"] and env["PYTHONUNBUFFERED"] == "1"


def test_smoke_check_of_a_training_run():
    ok = {"status": "completed", "device": "cuda:0", "final_loss": 0.9, "nonfinite_steps": 0}
    assert train_check(ok, "cuda") is None
    assert "non-finite" in train_check({**ok, "nonfinite_steps": 2}, "cuda")
    assert "final loss nan" in train_check({**ok, "final_loss": float("nan")}, "cuda")
    assert "not cuda" in train_check({**ok, "device": "cpu"}, "cuda")
    assert "status failed" in train_check({**ok, "status": "failed", "error": "boom"}, "cuda")
    assert train_check(None, "cuda") == "no metrics.json"


def bench_result(method: str, its: float, peak_gb: float | None = None, fwd: int = 3, **extra) -> dict:
    r = {
        "method": method,
        "status": "passed",
        "seconds_per_iter": 1 / its,
        "iters_per_second": its,
        "forward_passes_per_iter": fwd,
        "run_steps": 30_000,
        **extra,
    }
    if peak_gb is not None:  # context 0.5 GB, weights 0.9 GB, the rest activations and cache
        r.update(
            cuda_device_peak_bytes=int(peak_gb * GB),
            cuda_max_reserved_bytes=int((peak_gb - 0.5) * GB),
            cuda_max_allocated_bytes=int((peak_gb - 0.6) * GB),
            weight_bytes={"unet": int(0.8 * GB), "text_encoder": int(0.1 * GB)},
        )
    return r


def test_verdicts_from_bench_results():
    sd15 = [
        bench_result("zoodip", 30.0, peak_gb=1.5),
        bench_result("zoodip_compile", 60.0),
        bench_result("ti", 15.0, fwd=1),
        bench_result("zoodip_n1", 90.0, fwd=2),
    ]
    sdxl = [bench_result("zoodip", 5.0, peak_gb=4.4)]
    peak15, speed, peakxl, minutes = verdicts({"sd15": sd15, "sdxl": sdxl})
    assert peak15["status"] == "met" and peak15["value"] == pytest.approx(1.5, abs=1e-6)
    assert speed["status"] == "met" and speed["value"] == pytest.approx(4.0)  # the fastest n=2 variant, not n=1
    assert "zoodip_compile" in speed["measured"]
    assert minutes["status"] == "met" and minutes["value"] == pytest.approx(30_000 / 60 / 60)
    assert peakxl["status"] == "missed" and peakxl["value"] == pytest.approx(4.4, abs=1e-6)
    assert peakxl["limited_by"].startswith("largest: activations") and "CUDA context 0.50 GB" in peakxl["limited_by"]
    parts = memory_breakdown(sdxl[0])
    expected = {"CUDA context": 0.5, "weights": 0.9, "activations": 2.9, "allocator cache": 0.1}
    assert {k: round(v / GB, 3) for k, v in parts.items()} == expected

    slow = [bench_result("zoodip", 40.0, peak_gb=1.7), bench_result("ti", 20.0, fwd=1)]
    peak15, speed, peakxl, minutes = verdicts({"sd15": slow})
    assert peak15["status"] == "missed" and "weights 0.90 GB" in peak15["limited_by"]
    assert speed["status"] == "missed" and speed["value"] == pytest.approx(2.0) and "3 forwards" in speed["limited_by"]
    assert minutes["status"] == "missed" and minutes["value"] == pytest.approx(12.5)
    assert minutes["limited_by"] == "25.0 ms per iteration; <= 20.0 needed"
    assert peakxl["status"] == "not measured" and peakxl["limited_by"] is None
    assert verdicts({"sd15": [bench_result("ti", 20.0, fwd=1)]})[1]["status"] == "not measured"


def test_a_bench_table_per_architecture_in_the_markdown(tmp_path):
    report = Report(tmp_path, header(), ["bench/sd15/zoodip", "bench/sd15/ti"])
    extra = {
        "arch": "sd15",
        "resolution": 512,
        "weights": "int8",
        "dtype": "float16",
        "baseline_bytes": GB,
        "peak_load_bytes": GB,
        "peak_train_bytes": GB,
        "note": None,
    }
    report.record("bench/sd15/zoodip", bench_result("zoodip", 30.0, peak_gb=1.5, **extra))
    report.record(
        "bench/sd15/ti",
        {**extra, "method": "ti", "status": "failed", "error": "timed out after 9 s", "seconds_per_iter": None},
    )
    md = (tmp_path / "gpu-check.md").read_text()
    assert "### zoodip-bench sd15" in md and "| ti | failed: timed out after 9 s |" in md
    assert "| SD1.5 INT8 device-wide peak <= 1.6 GB (paper 2.37 GB) | met |" in md


# ---------------------------------------------------------------- the training step on a stand-in device
@pytest.fixture(scope="module")
def meta_tiny():
    """The tiny model (INT8, quanto's own kernels as on CUDA) moved to the meta device."""
    from zoodip.method.objective import TextConditioner
    from zoodip.models.loading import load_components

    parts = load_components("tiny", "random", None, torch.float32, torch.device("cpu"), "int8", fast_cpu_int8=False)
    text = TextConditioner(parts, "<x>", "dog", 1)
    for module in [parts.unet, *parts.text_encoders]:
        module.to("meta")
    parts.device = torch.device("meta")
    return parts, text


@pytest.mark.parametrize("batched", [False, True])
def test_a_training_step_never_reads_back_from_the_device(meta_tiny, batched):
    """set_sample and every loss of a step run with the model on a device: no `.cpu()` / `.item()` between the
    forwards (on CUDA each one is a stall; on meta it raises), no CPU tensor mixed in (the timestep, the
    candidates, the target). The per-step read of the losses happens in the estimator, after all forwards."""
    from zoodip.method.objective import Objective

    parts, text = meta_tiny
    objective = Objective(parts, text, batched=batched, max_batch=2)
    z0 = torch.randn(1, parts.unet.config.in_channels, 8, 8)
    with torch.inference_mode():
        objective.set_sample(z0, torch.randn_like(z0), 999, "a photo of {}")
        losses = objective.losses(torch.zeros(3, text.dim))  # candidates built on the host, as the estimators do
        objective.set_sample(z0, torch.randn_like(z0), 500, "a photo of {}", target=torch.zeros_like(z0))
        planted = objective.losses(torch.zeros(1, text.dim))
    assert losses.device.type == "meta" and losses.shape == (3,) and planted.shape == (1,)
    assert objective.forward_passes == 4


def test_the_loss_of_a_half_precision_prediction_is_computed_in_fp32():
    """At large timesteps an fp16 prediction far from the noise squares past fp16's 65,504: the loss must not."""
    from zoodip.method.objective import Objective

    pred = torch.full((1, 4, 8, 8), 300.0, dtype=torch.float16)
    unet = lambda z, t, c, **kw: SimpleNamespace(sample=pred.expand(z.shape[0], -1, -1, -1))  # noqa: E731
    parts = SimpleNamespace(unet=unet, device=torch.device("cpu"), dtype=torch.float16, is_sdxl=False)
    text = SimpleNamespace(encode=lambda ids, thetas: (torch.zeros(thetas.shape[0], 77, 8, dtype=torch.float16), None))
    objective = Objective(parts, text)
    objective.z_t, objective.t, objective.ids = torch.zeros(1, 4, 8, 8, dtype=torch.float16), torch.tensor([999]), []
    objective.target = torch.zeros(1, 4, 8, 8)
    assert objective.losses(torch.zeros(2, 8)).tolist() == [90000.0, 90000.0]


def test_a_quantized_half_precision_vae_that_needs_upcasting_encodes_and_decodes():
    """On CUDA the model runs fp16; the SDXL and toy-world VAEs say `force_upcast`, and `encode_latents` (like
    diffusers' SDXL pipeline, `upcast_vae`) then called vae.to(fp32) on quantized weights, which quanto refuses ("The
    dtype of a weights Tensor cannot be changed"). `quantize_vae` keeps such a VAE fp32 and casts its inputs."""
    from diffusers import AutoencoderKL

    from zoodip.data.dataset import encode_latents
    from zoodip.models.loading import quantize_vae

    vae = AutoencoderKL.from_pretrained(ROOT / "zoodip" / "assets" / "toyworld" / "vae", torch_dtype=torch.float16)
    assert vae.config.force_upcast
    quantize_vae(vae, "int8")
    mean, _ = encode_latents(vae, torch.zeros(1, 3, 32, 32), torch.device("cpu"))
    assert torch.isfinite(mean).all() and vae.dtype == torch.float32
    image = vae.decode(mean.half()).sample  # half-precision latents, as a CUDA pipeline hands them over
    assert image.dtype == torch.float32 and torch.isfinite(image).all()
