"""Every config composes, and the paper's hyperparameters are the defaults."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from zoodip import CONF_DIR, ROOT


def compose_raw(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def test_paper_defaults():
    cfg = compose_raw()
    assert cfg.model.arch == "sd15" and cfg.quantization.weights == "int8"
    assert cfg.estimator.name == "rge" and cfg.estimator.n == 2 and cfg.estimator.mu == 1e-3
    assert cfg.sg.enabled and cfg.sg.tau == 128 and cfg.sg.nu == 1e-3
    assert cfg.puts.kind == "puts" and (cfg.puts.t_low, cfg.puts.t_high) == (500, 900)
    assert cfg.train.steps == 30000 and cfg.optimizer.name == "adam" and cfg.optimizer.lr == 5e-3
    assert cfg.logger.name == "wandb" and cfg.logger.mode == "offline"


def test_model_specific_paper_defaults():
    sd21 = compose_raw("model=sd21")
    assert sd21.estimator.mu == 1e-2 and sd21.optimizer.lr == 1e-2 and sd21.train.steps == 30000
    sdxl = compose_raw("model=sdxl")
    assert sdxl.estimator.mu == 1e-2 and sdxl.puts.t_low == 700 and sdxl.train.steps == 20000
    int4 = compose_raw("quantization=int4")
    assert int4.model.dtype == "bf16" and int4.estimator.mu == 1e-2
    # an explicit choice on the command line still wins over the model's default
    assert compose_raw("model=sdxl", "estimator.mu=0.005").estimator.mu == 0.005


def _options(group_dir: Path) -> list[str]:
    return sorted(p.stem for p in group_dir.glob("*.yaml"))


GROUPS = ["model", "quantization", "estimator", "sg", "puts", "optimizer", "data", "logger"]


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes(group):
    options = _options(CONF_DIR / group)
    assert options
    for option in options:
        cfg = compose_raw(f"{group}={option}")
        assert cfg[group] is not None


@pytest.mark.parametrize("name", _options(ROOT / "experiments"))
def test_every_experiment_composes(name):
    cfg = compose_raw(f"experiments={name}")
    assert cfg.train.steps >= 1


def test_experiment_demo_is_offline_and_on_the_toy_world():
    cfg = compose_raw("experiments=demo")
    assert cfg.model.arch == "toyworld" and cfg.eval.kind == "toyworld" and cfg.logger.mode == "offline"
    assert cfg.estimator.name == "rge" and cfg.sg.enabled and cfg.puts.kind == "puts"  # the paper's ZOODiP
    planted = compose_raw("experiments=planted")
    assert planted.model.arch == "tiny" and planted.data.kind == "planted"


def test_runs_land_under_outputs_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True)
    assert cfg.hydra.run.dir.startswith(str(ROOT / "outputs"))


@pytest.mark.parametrize("name", _options(ROOT / "hparams_search"))
def test_every_hparams_search_composes(name):
    cfg = compose_raw(f"hparams_search={name}")
    assert cfg.optimized_metric and cfg.tuning_subjects and cfg.train.steps >= 1
