"""Property tests over the config schema (zoodip/schema.py KNOBS): every knob at its limit and past it, wrong types,
unknown keys. A bad value is a ZoodipError naming the key (exit code 2 on the command line); a value at a limit passes
the checks and trains its first step on the tiny model.
"""

from __future__ import annotations

import copy
import math
import sys

import pytest
from conftest import compose_train
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import DictConfig, OmegaConf, open_dict

from zoodip.errors import ZoodipError
from zoodip.runtime.train import main, run
from zoodip.schema import KNOBS, SEED_MAX, Knob, check_config, check_knobs, data_settings, model_settings

FEW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
PLANTED = ["data=planted", "data.eval_points=2"]
BASE = {
    "": compose_train(*PLANTED),
    "method.": compose_train(*PLANTED, "method=gfti"),
    "estimator.smoothing": compose_train(*PLANTED, "estimator=hizoo"),
    "puts.stratified": compose_train(*PLANTED, "estimator=spsa"),
}
BASE["estimator.clip"] = BASE["estimator.smoothing"]
BASE["estimator.unbiased"] = compose_train(*PLANTED, "estimator=guided")


def base_for(key: str) -> DictConfig:
    """The config a knob belongs to: method.* GF-TI's, hizoo's and guided's own keys theirs, puts.stratified an
    estimator of +/- pairs (spsa), the rest the default's."""
    return copy.deepcopy(BASE["method."] if key.startswith("method.") else BASE.get(key, BASE[""]))


def with_value(key: str, value) -> DictConfig:
    cfg = base_for(key)
    OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def at_limits(knob: Knob) -> list:
    """The allowed values at the edges of the knob's range (just inside an open edge)."""
    if knob.kind is bool:
        return [True, False]
    edges = []
    for edge, is_open, inward in ((knob.low, knob.open_low, math.inf), (knob.high, knob.open_high, -math.inf)):
        if edge is not None:
            edges.append(math.nextafter(edge, inward) if is_open else knob.kind(edge))
    return edges


def past_limits(knob: Knob) -> list:
    """The values just past each edge."""
    values = []
    for edge, is_open, outward in ((knob.low, knob.open_low, -math.inf), (knob.high, knob.open_high, math.inf)):
        if edge is None:
            continue
        if is_open:
            values.append(knob.kind(edge))
        else:
            values.append(int(edge) + (1 if outward > 0 else -1) if knob.kind is int else math.nextafter(edge, outward))
    return values


def wrong_types(knob: Knob) -> list:
    if knob.kind is bool:
        return [1, 0, "true", [True]] + ([] if knob.nullable else [None])
    common = ["3", True, [1], {"a": 1}, math.nan] + ([] if knob.nullable else [None])
    return common + ([1.5, 2.0] if knob.kind is int else [math.inf, -math.inf])


def bad_cases() -> list[tuple[str, object]]:
    return [(key, v) for key, knob in KNOBS.items() for v in past_limits(knob) + wrong_types(knob)]


def good_cases() -> list[tuple[str, object]]:
    return [(key, v) for key, knob in KNOBS.items() for v in at_limits(knob)]


@FEW
@given(st.sampled_from(bad_cases()))
def test_a_value_past_a_limit_or_of_the_wrong_type_names_its_key(case):
    key, value = case
    with pytest.raises(ZoodipError, match=rf"^{key.replace('.', '[.]')} must be "):
        check_knobs(with_value(key, value))


@FEW
@given(st.sampled_from(list(KNOBS)).flatmap(lambda key: st.tuples(st.just(key), st.data())))
def test_any_value_inside_the_range_passes_and_any_outside_fails(case):
    key, data = case
    knob = KNOBS[key]
    if knob.kind is bool:
        return
    low = -(2**70) if knob.low is None else knob.low
    high = 2**70 if knob.high is None else knob.high
    if knob.kind is int:
        value = data.draw(st.integers(min_value=int(low) - 50, max_value=int(min(high, low + 10**6)) + 50))
    else:
        value = data.draw(st.floats(min_value=low - 1, max_value=min(high, 1e6) + 1, allow_nan=False))
    inside = knob.allows(value)
    # an unbounded side (low or high None) admits everything: the +/-2**70 above only bound the draw
    above = knob.low is None or (value > low if knob.open_low else value >= low)
    below = knob.high is None or (value < high if knob.open_high else value <= high)
    assert inside == (above and below)
    if inside:
        check_knobs(with_value(key, value))
    else:
        with pytest.raises(ZoodipError, match=key.replace(".", "[.]")):
            check_knobs(with_value(key, value))


def test_every_limit_passes_the_checks():
    for key, value in good_cases():
        cfg = with_value(key, value)
        check_config(cfg)
        check_config(cfg)


@pytest.mark.parametrize("value", [-1, 900, 5000])
def test_puts_limits_are_checked_as_a_pair_naming_the_key(value):
    """t_low and t_high have their types checked as knobs, their range as a rule between the two."""
    cfg = with_value("puts.t_low", value)
    check_knobs(cfg)
    with pytest.raises(ZoodipError, match=r"puts.t_low must satisfy 0 <= t_low < t_high"):
        check_config(cfg)


# train.forward_budget's real floor is the method's passes per step (tests/test_efficiency.py), not the knob's 1.
# train.distributed=true is valid but needs several processes (tests/test_distributed.py runs it, and its one-process
# error); as one process it stops with that sentence before a step.
STEP_CASES = [
    c
    for c in good_cases()
    if not c[0].startswith(("method.", "eval.", "train.forward_budget")) and c != ("train.distributed", True)
]


def first_step(tmp_path, key: str, value) -> None:
    cfg = with_value(key, value)
    OmegaConf.update(cfg, "train.steps", 1 if key != "train.steps" else value)
    metrics = run(cfg, tmp_path)
    assert metrics["status"] == "completed" and metrics["steps"] == 1


@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(STEP_CASES))
def test_a_value_at_its_limit_trains_its_first_step(tmp_path_factory, case):
    first_step(tmp_path_factory.mktemp("limit"), *case)


@pytest.mark.slow
@pytest.mark.parametrize("case", STEP_CASES, ids=[f"{k}={v!r}" for k, v in STEP_CASES])
def test_every_limit_trains_its_first_step(tmp_path, case):
    first_step(tmp_path, *case)


def test_limits_are_the_documented_ones():
    assert KNOBS["train.seed"].allows(SEED_MAX) and not KNOBS["train.seed"].allows(SEED_MAX + 1)
    assert KNOBS["sg.nu"].describe() == "a finite number > 0 and < 1"
    assert KNOBS["train.log_every"].describe() == "an integer >= 1"


@pytest.mark.parametrize("key", ["train.stpes", "estimator.nn", "sg.tua", "frobnicate", "data.captoins"])
def test_unknown_keys_are_named(key):
    cfg = base_for(key)
    with pytest.raises(ZoodipError, match=rf"^unknown config key {key.replace('.', '[.]')}: "):
        OmegaConf.set_struct(cfg, False)
        OmegaConf.update(cfg, key, 5, force_add=True)
        check_config(cfg)


@pytest.mark.parametrize(
    "preset",
    [
        "toyworld",
        "toyworld_ti",
        "demo",
        "ti",
        "planted",
        "gfti_sd15",
        "zoodip_sdxl",
        "zoodip_int4",
        "ti_sd21",
        "toyworld_fast",
        "zoodip_fast_sd15",
    ],
)
def test_every_shipped_preset_passes_the_schema(preset):
    check_config(compose_train(f"experiments={preset}"))


def test_betas():
    for betas in ([0.0, 0.0], [0.9, math.nextafter(1.0, 0.0)]):
        check_config(with_value("optimizer.betas", betas))
    for betas in ([0.9], [0.9, 1.0], [-0.1, 0.9], ["a", 0.9], [0.9, 0.99, 0.9]):
        with pytest.raises(ZoodipError, match=r"optimizer.betas must be two numbers in \[0, 1\)"):
            check_config(with_value("optimizer.betas", betas))


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("estimator.mu=abc", "estimator.mu must be a finite number > 0, got 'abc'"),
        ("train.log_every=0", "train.log_every must be an integer >= 1, got 0"),
        ("+train.stpes=5", "unknown config key train.stpes"),
        ("train.seed=-1", "train.seed must be an integer >= 0"),
    ],
)
def test_the_command_line_exits_2_naming_the_key(tmp_path, monkeypatch, capsys, override, named):
    argv = ["zoodip-train", "model=tiny", "logger=none", *PLANTED, override, f"hydra.run.dir={tmp_path / 'run'}"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize(
    ("overrides", "word", "source"),
    [
        (["data=dreambooth", "data.subject=dog6"], "dog", "data.subject=dog6's initializer (the DreamBooth table)"),
        (["data=dreambooth", "data.subject=dog6", "data.initializer_token=puppy"], "puppy", "data.initializer_token"),
        (["model=toyworld", "data=planted"], "object", "model.initializer_token"),
    ],
)
def test_the_initializer_word_and_the_key_that_chose_it(overrides, word, source):
    """data.initializer_token first, then the DreamBooth table's word for the subject, then the model's own word."""
    data = data_settings(compose_train(*overrides))
    assert (data.initializer_word(), data.initializer_source) == (word, source)


def test_a_config_that_names_no_initializer_is_one_sentence():
    cfg = compose_train(*PLANTED)
    with open_dict(cfg):
        cfg.model.initializer_token = None
    with pytest.raises(ZoodipError, match="data.initializer_token is not set and data.subject='planted'"):
        data_settings(cfg).initializer_word()


def test_model_settings_read_the_model_and_quantization_groups():
    m = model_settings(compose_train("model=toyworld", "quantization=int4", "model.seed=7"))
    expected = ("toyworld", "pretrained", 7, 32, "int4", "int8")
    assert (m.arch, m.init, m.seed, m.resolution, m.weights, m.others) == expected
    assert m.path.endswith("zoodip/assets/toyworld") and m.folder().is_dir() and not m.is_sdxl
