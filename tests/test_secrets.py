"""Secrets stay out: with credentials in the environment, a training run with W&B (offline), its evaluation and a
report write none of them into any file: saved config, logs, metrics.json, the W&B run, the report.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SECRETS = {
    "WANDB_API_KEY": "zoodipfake" + "0123456789abcdef0123456789ab",  # 40 characters, as a W&B key
    "HF_TOKEN": "hf_zoodipFakeToken0123456789abcdefGHIJ",
    "HUGGING_FACE_HUB_TOKEN": "hf_zoodipOtherFake0123456789abcdefKLM",
    "AWS_SECRET_ACCESS_KEY": "zoodipFakeAwsSecret/0123456789+abcdefXYZ",
}


def zoodip(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **SECRETS, "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd, env=env)


def test_no_credential_from_the_environment_reaches_any_output(tmp_path):
    sweep = tmp_path / "sweep"
    train = zoodip(
        "zoodip.runtime.train",
        "-m",
        "experiments=toyworld",
        "data.subject=red_circle",
        "model.steps=4",
        "eval.enabled=true",
        "eval.images_per_prompt=1",
        "eval.num_inference_steps=2",
        "logger=wandb",
        "logger.mode=offline",
        "train.progress=false",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    report = zoodip("zoodip.analysis.report", str(sweep), "logger.mode=offline", cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-3000:]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "metrics.json" for p in files) and any("offline-run-" in str(p) for p in files)
    assert any(p.parent.name == "report" for p in files)
    for name, secret in SECRETS.items():
        for stream in (train.stdout, train.stderr, report.stdout, report.stderr):
            assert secret not in stream, name
        leaks = [str(p.relative_to(tmp_path)) for p in files if secret.encode() in p.read_bytes()]
        assert not leaks, f"{name} found in {leaks}"
