"""Reliability of a run: preemption by signal, one writer per run folder, checkpoints that know their
config, numerical health. In-process on the tiny model; the real-process versions are in test_fault_injection.py.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from conftest import compose_train
from safetensors.torch import load_file

from zoodip import __version__
from zoodip.errors import ZoodipError
from zoodip.io import read_json
from zoodip.method.estimators import RGE
from zoodip.runtime import preemption
from zoodip.runtime.checkpoint import check_resumable, load_checkpoint, math_differences, run_config
from zoodip.runtime.health import Health
from zoodip.runtime.preemption import EXIT_PREEMPTED, Preempted
from zoodip.runtime.runlock import LOCK_FILE, run_lock
from zoodip.runtime.tracking import Tracker
from zoodip.runtime.train import run

# The only checkpoint: the preemption's. Few planted eval points: fast.
COMMON = ["data=planted", "data.eval_points=2", "train.steps=8", "train.checkpoint_every=0"]


def run_tiny(run_dir: Path, *overrides: str) -> dict:
    return run(compose_train(*COMMON, *overrides), run_dir)


def token(run_dir: Path) -> torch.Tensor:
    return load_file(run_dir / "learned_embeds.safetensors")["<planted>"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> torch.Tensor:
    """The token of an uninterrupted 8-step run."""
    folder = tmp_path_factory.mktemp("straight")
    run_tiny(folder)
    return token(folder)


def at_call(k: int, action, monkeypatch) -> None:
    """Run `action()` inside the k-th gradient estimate (inside step k), then finish that estimate normally."""
    real, calls = RGE.function, []

    def estimator(*args, **kwargs):
        calls.append(1)
        if len(calls) == k:
            action()
        return real(*args, **kwargs)

    monkeypatch.setattr(RGE, "function", staticmethod(estimator))


def kill_self(signum: int):
    return lambda: os.kill(os.getpid(), signum)


# ---------------------------------------------------------------------------------------------------------------
# preemption


def test_each_signal_finishes_the_step_checkpoints_and_the_resumed_run_is_identical(tmp_path, monkeypatch, straight):
    """SIGTERM while the model loads (before step 1), then SIGTERM, SIGINT and SIGUSR2 inside steps 2, 4 and 6, each
    followed by train.resume=auto (the default): the token ends bit-identical to an uninterrupted run's."""
    import zoodip.runtime.train as train_module

    real_setup = train_module.setup

    def setup_then_sigterm(*args, **kwargs):
        result = real_setup(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(train_module, "setup", setup_then_sigterm)
    stages = [(None, signal.SIGTERM, 0), (2, signal.SIGTERM, 2), (2, signal.SIGINT, 4), (2, signal.SIGUSR2, 6)]
    for k, signum, step in stages:
        before = signal.getsignal(signum)
        if k is not None:
            at_call(k, kill_self(signum), monkeypatch)
        with pytest.raises(Preempted) as stop:
            run_tiny(tmp_path)
        monkeypatch.undo()
        assert stop.value.step == step and signal.getsignal(signum) is before  # the handlers are put back
        metrics = read_json(tmp_path / "metrics.json")
        assert metrics["status"] == "preempted" and metrics["signal"] == signal.Signals(signum).name
        assert metrics["checkpoint_step"] == step and metrics["config"]["train"]["steps"] == 8
        if step:
            assert load_checkpoint(tmp_path / "checkpoints" / "last.json").step == step  # the step ended, then saved
    resumed = run_tiny(tmp_path)
    assert resumed["status"] == "completed" and resumed["resumed_from_step"] == 6
    assert torch.equal(token(tmp_path), straight)


def test_a_second_signal_stops_at_once_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    def twice():
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)

    at_call(5, twice, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run_tiny(tmp_path, "train.checkpoint_every=2")
    assert read_json(tmp_path / "metrics.json")["status"] == "interrupted"
    assert load_checkpoint(tmp_path / "checkpoints" / "last.json").step == 4


def test_the_signal_is_handed_on_to_the_launcher_after_the_checkpoint(tmp_path, monkeypatch):
    """Under submitit, its SIGUSR2 handler requeues the job: zoodip calls it once the checkpoint is on disk."""
    seen = []

    def submitit_like(signum, frame):
        seen.append((signum, read_json(tmp_path / "metrics.json")["status"], (tmp_path / "checkpoints").is_dir()))
        raise SystemExit(144)  # what submitit's local requeue does

    old = signal.signal(signal.SIGUSR2, submitit_like)
    try:
        at_call(3, kill_self(signal.SIGUSR2), monkeypatch)
        with pytest.raises(SystemExit) as exit_:
            run_tiny(tmp_path)
        assert signal.getsignal(signal.SIGUSR2) is submitit_like
    finally:
        signal.signal(signal.SIGUSR2, old)
    assert exit_.value.code == 144 and seen == [(signal.SIGUSR2, "preempted", True)]
    assert not (tmp_path / LOCK_FILE).read_text()  # the lock was released on the way out


def test_the_submitit_launcher_is_checkpointable():
    """submitit requeues a job whose callable has `checkpoint` (it then resubmits the same job: same job dir)."""
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher

    assert callable(LocalLauncher.checkpoint) and callable(SlurmLauncher.checkpoint)
    assert preemption.previous_handler(signal.SIGINT) is None  # Python's KeyboardInterrupt default is not handed on


def test_exit_code_of_a_preempted_cli_run_is_documented():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert EXIT_PREEMPTED == 75 and "exit code 75" in readme


# ---------------------------------------------------------------------------------------------------------------
# one run folder, one writer


def test_a_second_run_on_a_live_run_folder_is_refused(tmp_path):
    held = rf"{tmp_path} is in use by another zoodip run \(pid {os.getpid()} on "
    with run_lock(tmp_path), pytest.raises(ZoodipError, match=held):
        run_tiny(tmp_path)
    assert not (tmp_path / "metrics.json").exists()  # the refused run wrote nothing


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    (tmp_path / LOCK_FILE).write_text("pid 999999 on elsewhere since 2020-01-01T00:00:00\n")
    with caplog.at_level(logging.WARNING, logger="zoodip.runtime.runlock"), run_lock(tmp_path) as path:
        assert path.read_text().startswith(f"pid {os.getpid()} ")
    assert "its holder (pid 999999 on elsewhere" in caplog.text and "no longer running" in caplog.text
    assert path.read_text() == ""  # released: nothing to take over next time
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="zoodip.runtime.runlock"), run_lock(tmp_path):
        pass
    assert not caplog.records


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_run_folder_is_a_clear_error(tmp_path):
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(ZoodipError, match="cannot create the lock file .* is the run folder writable"):
            run_tiny(tmp_path)
    finally:
        tmp_path.chmod(0o755)


# ---------------------------------------------------------------------------------------------------------------
# a checkpoint knows what it belongs to


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A completed 4-step run with a checkpoint at step 4 (not to be changed: copy it first)."""
    folder = tmp_path_factory.mktemp("finished")
    run(compose_train(*COMMON, "train.steps=4", "train.checkpoint_every=2"), folder)
    return folder


def copy_of(finished: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "run"))


def test_a_checkpoint_records_its_config_and_version(finished):
    tmp_path = finished
    record = json.loads((finished / "checkpoints" / "last.json").read_text())
    assert record["state"]["zoodip_version"] == __version__
    assert record["state"]["config"]["estimator"]["n"] == 2 and record["state"]["config"]["data"]["kind"] == "planted"
    state = load_checkpoint(tmp_path / "checkpoints" / "last.json")
    assert state.config == record["state"]["config"] and state.zoodip_version == __version__
    assert read_json(tmp_path / "metrics.json")["config"] == state.config


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("estimator.n=3", "estimator.n"),
        ("model=toyworld", "model.arch"),
        ("sg=off", "sg.enabled"),
        ("quantization=int4", "quantization.weights"),
        ("puts.t_low=600", "puts.t_low"),
        ("optimizer.lr=0.1", "optimizer.lr"),
        ("data.planted_rank=2", "data.planted_rank"),
        ("train.seed=1", "train.seed"),
        ("estimator=spsa", "estimator.name"),
    ],
)
def test_resuming_under_other_math_is_refused_naming_the_keys(finished, override, key):
    record = finished / "checkpoints" / "last.json"
    cfg = compose_train(*COMMON, "train.steps=8", override)
    with pytest.raises(ZoodipError, match=rf"was made with another config \(.*{key}: .*train.resume=null") as err:
        check_resumable(record, cfg)
    assert key in math_differences(load_checkpoint(record).config, run_config(cfg))
    assert "train.steps" not in str(err.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ("train.steps=9",),
        ("model.steps=9",),
        ("logger=wandb",),
        ("eval.every=5", "eval.enabled=true"),
        ("train.progress=true", "train.log_every=2", "train.save_every=3", "train.checkpoint_every=5"),
        ("train.max_nonfinite=3", "train.max_bad_steps=1", "train.device=cpu", "hydra.job.name=x"),
    ],
)
def test_steps_up_logging_eval_and_progress_may_change(finished, overrides):
    record = finished / "checkpoints" / "last.json"
    check_resumable(record, compose_train(*COMMON, *[o for o in overrides if not o.startswith("hydra")]))


def test_a_run_resumes_from_another_checkout_of_the_repository():
    """The shipped assets (the toy world, its captions) sit at the same paths relative to each clone: a run moved
    between clones or worktrees is the same math, while a path that points elsewhere is not."""
    here = run_config(compose_train("experiments=toyworld"))
    root = here["paths"]["root_dir"]
    moved = json.loads(json.dumps(here).replace(root, "/elsewhere/clone"))
    assert moved["data"]["captions"].startswith("/elsewhere/clone/") and math_differences(here, moved) == []
    outside = json.loads(json.dumps(here))
    outside["data"]["captions"] = "/elsewhere/captions.json"
    assert math_differences(here, outside) == ["data.captions"]
    # a subject of the checkout's own dataset/ may hold other images in another clone: compared as it is
    dataset = run_config(compose_train("data=dreambooth", "data.subject=dog6"))
    other = json.loads(json.dumps(dataset).replace(dataset["paths"]["root_dir"], "/elsewhere/clone"))
    assert math_differences(dataset, other) == ["data.path"]


def test_train_steps_is_math_under_a_decaying_learning_rate():
    """A cosine schedule spans train.steps, so raising it changes the remaining updates: refused, unlike constant."""
    constant = [run_config(compose_train(*COMMON, f"train.steps={n}")) for n in (4, 8)]
    cosine = [run_config(compose_train(*COMMON, "optimizer.schedule=cosine", f"train.steps={n}")) for n in (4, 8)]
    assert math_differences(*constant) == [] and math_differences(*cosine) == ["train.steps"]


def test_train_steps_below_the_checkpoint_is_refused(finished):
    record = finished / "checkpoints" / "last.json"
    with pytest.raises(ZoodipError, match=r"train.steps=3 is below the step of checkpoint .* \(4\)"):
        check_resumable(record, compose_train(*COMMON, "train.steps=3"))


def test_a_completed_run_is_skipped_only_under_the_same_config(finished, tmp_path):
    tmp_path = copy_of(finished, tmp_path)
    metrics_file = tmp_path / "metrics.json"
    before = metrics_file.read_bytes()
    assert run_tiny(tmp_path, "train.steps=4", "train.checkpoint_every=2")["status"] == "completed"
    assert metrics_file.read_bytes() == before  # skipped: nothing rewritten
    with pytest.raises(ZoodipError, match=r"the completed run in .* another config \(estimator.mu: 0.001 -> 0.002"):
        run_tiny(tmp_path, "train.steps=4", "estimator.mu=0.002")
    assert metrics_file.read_bytes() == before  # a refused run loses nothing


def test_raising_train_steps_continues_a_completed_run_exactly(finished, tmp_path, straight):
    tmp_path = copy_of(finished, tmp_path)
    metrics = run_tiny(tmp_path)  # 8 steps now: continues from the checkpoint at step 4
    assert metrics["resumed_from_step"] == 4 and torch.equal(token(tmp_path), straight)


def test_a_checkpoint_of_an_older_zoodip_without_a_config_still_resumes(finished, tmp_path, caplog):
    record = copy_of(finished, tmp_path) / "checkpoints" / "last.json"
    content = json.loads(record.read_text())
    del content["state"]["config"], content["state"]["zoodip_version"]
    record.write_text(json.dumps(content))
    with caplog.at_level(logging.WARNING, logger="zoodip.runtime.checkpoint"):
        check_resumable(record, compose_train(*COMMON, "estimator.n=3"))
    assert "records no config" in caplog.text
    assert load_checkpoint(record).config is None


# ---------------------------------------------------------------------------------------------------------------
# numerical health


def test_consecutive_non_finite_steps_fail_the_run_keeping_the_last_good_token(tmp_path, monkeypatch):
    real, calls = RGE.function, []

    def nan_from_step_4(*args, **kwargs):
        est = real(*args, **kwargs)
        calls.append(1)
        if len(calls) >= 4:
            est.loss, est.grad = float("nan"), torch.full_like(est.grad, float("nan"))
        return est

    monkeypatch.setattr(RGE, "function", staticmethod(nan_from_step_4))
    with pytest.raises(FloatingPointError, match=r"3 steps in a row had a non-finite loss \(train.max_bad_steps=3\)"):
        run_tiny(tmp_path / "bad", "train.max_bad_steps=3", "train.checkpoint_every=1")
    metrics = read_json(tmp_path / "bad" / "metrics.json")
    assert metrics["status"] == "failed" and "train.max_bad_steps=3" in metrics["error"]
    last = load_checkpoint(tmp_path / "bad" / "checkpoints" / "last.json")  # after step 5: steps 4 and 5 skipped
    assert last.step == 5 and [math.isnan(r["loss"]) for r in last.history] == [False] * 3 + [True] * 2
    assert torch.equal(token(tmp_path / "bad")[0], last.theta)  # the token after step 3, the last good one


def test_health_counts_bad_steps_in_a_row_only():
    health = Health(max_bad_steps=3)
    for loss in [1.0, math.nan, math.nan, 1.0, math.nan, math.nan]:
        health.observe(loss)
    assert health.failed is None
    health.observe(math.inf)
    assert "3 steps in a row" in health.failed
    assert Health(max_bad_steps=0).failed is None


def test_divergence_warns_once_per_episode():
    health = Health(max_bad_steps=0, losses=[1.0] * 5)
    assert [health.observe(50.0) for _ in range(10)] == [None] * 10  # fewer than 10 losses before the recent 10
    health = Health(max_bad_steps=0, losses=[1.0, 2.0] * 50)
    # a sustained rise: the median of the last 10 passes 10x (15) once half of them are high; six low losses end
    # the episode, and the next rise is a new one (a NaN step is skipped)
    warnings = [health.observe(loss) for loss in [30.0] * 6 + [1.0] * 6 + [100.0] * 6 + [math.nan, 120.0]]
    assert [i for i, w in enumerate(warnings) if w is not None] == [4, 16]
    assert "the median 16 of the last 10 finite losses is more than 10x the median 1 of the 95 before" in warnings[4]


def test_single_spikes_are_not_divergence():
    """Uniform timesteps make one-sample losses swing by more than 10x: isolated spikes must stay silent."""
    health = Health(max_bad_steps=0, losses=[1.0] * 100)
    assert all(health.observe(loss) is None for loss in [1.0, 1.0, 1.0, 40.0] * 200)


def test_divergence_reaches_the_log_and_the_tracker(tmp_path, monkeypatch, caplog):
    real, calls = RGE.function, []

    def diverge_from_step_12(*args, **kwargs):
        est = real(*args, **kwargs)
        calls.append(1)
        if len(calls) >= 12:
            est.loss = 1e6
        return est

    monkeypatch.setattr(RGE, "function", staticmethod(diverge_from_step_12))
    logged = []
    monkeypatch.setattr(Tracker, "warn", lambda self, title, text, step: logged.append((title, step)))
    run_tiny(tmp_path, "train.steps=24")
    # no verdict before 20 losses (10 before the recent 10); at step 20 nine of the last 10 are 1e6
    assert logged == [("divergence", 20)]


def test_tracker_warn_logs_a_metric_and_alerts_online(caplog):
    class Run:
        def __init__(self, mode):
            self.settings, self.calls = type("S", (), {"mode": mode})(), []

        def log(self, metrics, step):
            self.calls.append(("log", metrics, step))

        def alert(self, **kwargs):
            self.calls.append(("alert", kwargs["title"], kwargs["level"]))

    for mode, alerts in (("offline", 0), ("online", 1)):
        tracker = Tracker.__new__(Tracker)
        tracker.run = Run(mode)
        with caplog.at_level(logging.WARNING, logger="zoodip.runtime.tracking"):
            tracker.warn("divergence", "the loss may be diverging", step=7)
        assert tracker.run.calls[0] == ("log", {"warnings/divergence": 1}, 7)
        assert sum(c[0] == "alert" for c in tracker.run.calls) == alerts
    assert "the loss may be diverging" in caplog.text
