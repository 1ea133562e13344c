"""hparams_search/: Optuna searches compose with equal budgets, and a tiny study runs end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from zoodip import CONF_DIR, ROOT
from zoodip.errors import ZoodipError
from zoodip.runtime.train import check_objective, objective_value

SEARCHES = sorted(p.stem for p in (ROOT / "hparams_search").glob("*.yaml"))
REPORTED_SUBJECTS = {"red_circle", "red_square", "red_triangle", "blue_star", "red_heart", "green_cross"}


def compose_search(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=[f"hparams_search={name}", *overrides], return_hydra_config=True)


@pytest.mark.parametrize("name", SEARCHES)
def test_every_search_composes_as_an_optuna_study(name):
    cfg = compose_search(name)
    sweeper = cfg.hydra.sweeper
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN" and "OptunaSweeper" in sweeper._target_
    assert sweeper.direction == "maximize" and sweeper.sampler.seed is not None and sweeper.max_failure_rate == 1.0
    assert cfg.optimized_metric == "eval/subject_accuracy" and cfg.eval.enabled and cfg.model.arch == "toyworld"
    assert len(cfg.tuning_subjects) == 2 and not set(cfg.tuning_subjects) & REPORTED_SUBJECTS
    for subject in cfg.tuning_subjects:
        assert (Path(cfg.paths.toyworld_dir) / "subjects" / subject).is_dir()
    check_objective(cfg)


def test_searches_share_one_budget_and_bracket_the_presets():
    zo, ti = compose_search("toyworld_zoodip"), compose_search("toyworld_ti")
    assert zo.hydra.sweeper.n_trials == ti.hydra.sweeper.n_trials
    assert zo.hydra.sweeper.sampler == ti.hydra.sweeper.sampler and zo.tuning_subjects == ti.tuning_subjects
    assert set(zo.hydra.sweeper.params) == {"optimizer.lr", "estimator.mu"}
    assert set(ti.hydra.sweeper.params) == {"optimizer.lr"}
    assert zo.estimator.name == "rge" and ti.estimator.name == "backprop"
    assert zo.optimizer.lr == 1e-2 and zo.estimator.mu == 2e-3 and ti.optimizer.lr == 1e-2
    searched = [(zo.hydra.sweeper.params["optimizer.lr"], 1e-2), (zo.hydra.sweeper.params["estimator.mu"], 2e-3)]
    searched.append((ti.hydra.sweeper.params["optimizer.lr"], 1e-2))
    for text, preset in searched:
        assert text.startswith("tag(log, interval(")
        low, high = (float(x) for x in text.split("interval(")[1].rstrip(")").split(","))
        assert low < preset < high


def test_the_default_objective_is_still_the_final_loss():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train")
    assert cfg.optimized_metric is None and cfg.tuning_subjects is None
    done = {"status": "completed", "final_loss": 0.5, "eval": {"subject_accuracy": 0.75}}
    assert objective_value(done, None) == 0.5 and objective_value(done, "eval/subject_accuracy") == 0.75
    assert objective_value({**done, "status": "failed"}, "eval/subject_accuracy") is None
    assert objective_value(done, "eval/prompt_accuracy") is None and objective_value(done, "loss_ratio") is None


@pytest.mark.parametrize(
    "overrides",
    [
        ["optimized_metric=eval/subject_accuracy", "eval.enabled=false"],
        ["tuning_subjects=[a,a]"],
        ["tuning_subjects=[]"],
        ["tuning_subjects=green_circle"],
    ],
)
def test_bad_objective_settings_are_one_sentence(overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with pytest.raises(ZoodipError):
        check_objective(cfg)


def test_a_tiny_optuna_study_survives_a_failed_trial_and_writes_its_best_params(tmp_path):
    sweep_dir = tmp_path / "study"
    # trial 0's first subject finds a completed run of other math in its folder: refused, so the trial fails
    refused = sweep_dir / "0" / "green_circle"
    refused.mkdir(parents=True)
    (refused / "metrics.json").write_text(json.dumps({"status": "completed", "config": {"train": {"seed": 99}}}))
    args = [
        "hparams_search=toyworld_zoodip",
        "experiments=planted",
        "optimized_metric=planted_cosine",
        "eval.enabled=false",
        "hydra.sweeper.n_trials=2",
        "train.steps=3",
        "data.eval_points=2",
        "sg.tau=4",
        "logger=none",
        "train.progress=false",
        f"hydra.sweep.dir={sweep_dir}",
        f"hydra.sweeper.storage=sqlite:///{tmp_path / 'study.db'}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}
    result = subprocess.run(
        [sys.executable, "-m", "zoodip.runtime.train", *args], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Failed experiment" in result.stdout + result.stderr
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"optimizer.lr", "estimator.mu"}
    objective = json.loads((sweep_dir / "1" / "objective.json").read_text())
    assert objective["optimized_metric"] == "planted_cosine"
    assert set(objective["by_subject"]) == {"green_circle", "green_triangle"}
    assert best["best_value"] == pytest.approx(objective["value"])
    for subject in ("green_circle", "green_triangle"):  # each subject's run is a complete, self-describing run folder
        run = sweep_dir / "1" / subject
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["status"] == "completed" and (run / "learned_embeds.safetensors").is_file()
        assert OmegaConf.load(run / ".hydra" / "config.yaml").data.subject == subject
    assert "job rejected" in result.stdout + result.stderr and not (sweep_dir / "0" / "objective.json").exists()
    # the study's trials are kept in the sqlite storage, where optuna's own tools read them
    kept = optuna.load_study(study_name="toyworld_zoodip", storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert [trial.state.name for trial in kept.trials] == ["FAIL", "COMPLETE"]
    assert kept.best_value == pytest.approx(best["best_value"])
