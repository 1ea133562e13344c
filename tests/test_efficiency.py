"""The equal-budget machinery: stratified PUTS, the forward-pass budget, kept tokens, and the true-gradient cosine."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import compose_train
from safetensors import safe_open

import zoodip.runtime.train as train_mod
from zoodip.errors import ZoodipError
from zoodip.method.objective import Objective
from zoodip.method.timesteps import TimestepSampler
from zoodip.runtime.train import run
from zoodip.schema import check_config, method_settings

SCHEDULE = torch.linspace(0.99, 0.01, 1000)


def test_strata_put_one_timestep_in_each_equal_slice():
    sampler = TimestepSampler("puts", 500, 900, SCHEDULE)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        times = sampler.strata(g, 4)
        assert [(t - 500) // 100 for t in times] == [0, 1, 2, 3]
    uniform = TimestepSampler("uniform", 0, 1000, SCHEDULE).strata(g, 2)
    assert 0 <= uniform[0] < 500 <= uniform[1] < 1000


def test_stratified_step_gives_each_pair_its_own_stratum(monkeypatch, tmp_path):
    """estimator=spsa n=2 with puts.stratified: each step scores its two +/- pairs two at a time, the first pair at
    a timestep from [500, 700), the second from [700, 900)."""
    pairs: list[int] = []
    real = Objective.losses

    def spy(self, thetas):
        if len(thetas) == 2:  # a +/- pair (the planted task's own evaluation scores one token at a time)
            pairs.append(int(self.t))
        return real(self, thetas)

    monkeypatch.setattr(Objective, "losses", spy)
    cfg = compose_train("data=planted", "estimator=spsa", "puts.stratified=true", "train.steps=3", "eval.enabled=false")
    metrics = run(cfg, tmp_path)
    assert metrics["forward_passes"] == 12 and len(pairs) == 6
    for first, second in zip(pairs[::2], pairs[1::2], strict=True):
        assert 500 <= first < 700 <= second < 900


@pytest.mark.parametrize("overrides", [("estimator=rge",), ("estimator=spsa", "puts=snr"), ("estimator=hizoo",)])
def test_stratified_needs_pairs_that_keep_common_random_numbers(overrides):
    with pytest.raises(ZoodipError, match="puts.stratified"):
        check_config(compose_train("puts.stratified=true", *overrides))


@pytest.mark.parametrize(("estimator", "budget", "steps"), [("rge", 10, 3), ("hizoo", 10, 3), ("spsa", 9, 2)])
def test_forward_budget_sets_the_steps(tmp_path, estimator, budget, steps):
    cfg = compose_train(
        "data=planted", f"estimator={estimator}", f"train.forward_budget={budget}", "eval.enabled=false"
    )
    metrics = run(cfg, tmp_path)
    assert metrics["steps"] == steps and metrics["forward_passes"] <= budget
    assert metrics["config"]["train"]["steps"] == steps


def test_forward_budget_below_one_step_is_one_sentence(tmp_path):
    with pytest.raises(ZoodipError, match="less than one step of spsa"):
        run(compose_train("data=planted", "estimator=spsa", "train.forward_budget=3"), tmp_path)
    assert not (tmp_path / "metrics.json").exists()


def test_kept_tokens_are_the_tokens_at_each_forward_pass_mark(tmp_path):
    """train.keep_tokens_every=6 with RGE (3 passes a step) over 5 steps: tokens at 0, 6 and 12 forward passes,
    and the final one at 15."""
    cfg = compose_train("data=planted", "train.steps=5", "train.keep_tokens_every=6", "eval.enabled=false")
    run(cfg, tmp_path)
    files = sorted((tmp_path / "tokens").glob("*.safetensors"))
    assert [f.name for f in files] == [f"fwd-{n:09d}.safetensors" for n in (0, 6, 12, 15)]
    with safe_open(files[-1], "pt") as f:
        assert f.metadata()["step"] == "5" and f.metadata()["forward_passes"] == "15"
        last = f.get_tensor("theta")
    with safe_open(tmp_path / "learned_embeds.safetensors", "pt") as f:
        final = f.get_tensor(f.keys()[0])
    assert torch.equal(last, final.reshape(-1))


def test_grad_cosine_is_one_for_backprop_and_a_cosine_for_rge(tmp_path):
    """train.grad_cosine_every: backprop through the unquantized fp32 model is the reference's own gradient (cosine
    1); RGE's estimates give cosines in [-1, 1], logged every K steps. The reference's passes are not counted."""
    ti = compose_train(
        "data=planted",
        "experiments=ti",
        "model=tiny",
        "train.steps=2",
        "train.grad_cosine_every=1",
        "eval.enabled=false",
    )
    run(ti, tmp_path / "ti")
    history = pd.read_csv(tmp_path / "ti" / "history.csv")
    assert history["grad_cosine"].tolist() == pytest.approx([1.0, 1.0], abs=1e-4)
    zo = compose_train("data=planted", "train.steps=4", "train.grad_cosine_every=2", "eval.enabled=false")
    metrics = run(zo, tmp_path / "zo")
    history = pd.read_csv(tmp_path / "zo" / "history.csv")
    cosines = history.set_index("step")["grad_cosine"]
    assert cosines[[1, 3]].isna().all() and cosines[[2, 4]].between(-1, 1).all()
    assert metrics["forward_passes"] == 12 == 4 * train_mod.METHODS["rge"].passes(method_settings(zo))
