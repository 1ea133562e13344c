"""The config's knobs: types, limits and known keys, checked before anything is loaded or written.

A wrong type, a value past its limit or a key that no config file defines is one sentence naming the key (ZoodipError,
exit code 2). Cross-key rules (t_low < t_high, a method's needs) stay in zoodip.runtime.train.validate.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from zoodip import CONF_DIR, ROOT
from zoodip.errors import ZoodipError

SEED_MAX = 2**63 - 1  # a signed 64-bit integer: what every seed reaches (the model builder packs it as one)


@dataclass(frozen=True)
class Knob:
    kind: type  # int, float or bool (a float knob takes ints too; no knob takes a bool but a bool one)
    low: float | None = None
    high: float | None = None
    open_low: bool = False  # low itself is not allowed
    open_high: bool = False
    nullable: bool = False  # null (unset) is allowed too

    def allows(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if self.kind is bool:
            return isinstance(value, bool)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or (self.kind is int and not isinstance(value, int)) or not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.open_low else value >= self.low)
        below = self.high is None or (value < self.high if self.open_high else value <= self.high)
        return above and below

    def describe(self) -> str:
        if self.kind is bool:
            return "true or false"
        kind = "an integer" if self.kind is int else "a finite number"
        low = f"{'>' if self.open_low else '>='} {self.low:g}" if self.low is not None else ""
        high = f"{'<' if self.open_high else '<='} {self.high:g}" if self.high is not None else ""
        if self.high == SEED_MAX:
            high = "<= 2**63 - 1"
        text = f"{kind} {' and '.join(p for p in (low, high) if p)}".strip()
        return f"{text} or null" if self.nullable else text


# Every numeric and boolean knob of the schema, where its config has it (method.* only for method=gfti). The range of
# puts.t_low / t_high is validate's (as a pair: 0 <= t_low < t_high <= the schedule's length). Not listed:
# model.resolution (the model's own: a multiple of its downsampling).
KNOBS: dict[str, Knob] = {
    "train.steps": Knob(int, 1),
    "train.seed": Knob(int, 0, SEED_MAX),
    "train.save_every": Knob(int, 0),
    "train.checkpoint_every": Knob(int, 0),
    "train.log_every": Knob(int, 1),
    "train.max_nonfinite": Knob(int, 0),
    "train.max_bad_steps": Knob(int, 0),
    "train.progress": Knob(bool),
    "estimator.n": Knob(int, 1),
    "estimator.mu": Knob(float, 0, open_low=True),
    "estimator.batched": Knob(bool),
    "estimator.max_batch": Knob(int, 1),
    "quantization.dequantized_copy": Knob(bool, nullable=True),
    "sg.enabled": Knob(bool),
    "sg.tau": Knob(int, 2),
    "sg.nu": Knob(float, 0, 1, open_low=True, open_high=True),
    "puts.t_low": Knob(int),  # the type here; the range in validate, as a pair: 0 <= t_low < t_high
    "puts.t_high": Knob(int),
    "puts.stratified": Knob(bool),
    "estimator.smoothing": Knob(float, 0, 1, open_low=True),
    "estimator.clip": Knob(float, 1),
    "estimator.unbiased": Knob(bool),
    "train.forward_budget": Knob(int, 1, nullable=True),
    "train.keep_tokens_every": Knob(int, 0),
    "train.grad_cosine_every": Knob(int, 0),
    "optimizer.lr": Knob(float, 0, open_low=True),
    "optimizer.eps": Knob(float, 0),
    "optimizer.weight_decay": Knob(float, 0),
    "data.num_vectors": Knob(int, 1),
    "data.flip_p": Knob(float, 0, 1),
    "data.allow_pickle": Knob(bool),
    "data.planted_rank": Knob(int, 1),
    "data.planted_scale": Knob(float, 0),
    "data.num_images": Knob(int, 1),
    "data.eval_points": Knob(int, 1),
    "data.seed": Knob(int, 0, SEED_MAX),
    "model.seed": Knob(int, 0, SEED_MAX),
    "eval.every": Knob(int, 0),
    "eval.enabled": Knob(bool),
    "method.intrinsic_dim": Knob(int, 1),
    "method.population": Knob(int, 2),
    "method.sigma": Knob(float, 0, open_low=True),
    "method.alpha": Knob(float, 0, open_low=True),
    "method.shared_sample": Knob(bool),
}
BETA = Knob(float, 0, 1, open_high=True)
GROUPS = ("paths", "method", "estimator", "sg", "puts", "optimizer", "data", "logger", "eval", "model", "quantization")


def _package(path: Path, default: str) -> str:
    first = path.read_text(encoding="utf-8").split("\n", 1)[0]
    return first.split("@package", 1)[1].strip() if "@package" in first else default


@functools.cache
def known_keys() -> dict[str, frozenset[str]]:
    """The keys each config node may hold: the union over every shipped config file ("" is the top level)."""
    known: dict[str, set[str]] = {"": {*GROUPS, "train"}, "train": set()}
    files = [(p, g) for g in GROUPS for p in (CONF_DIR / g).glob("*.yaml")]
    files += [(p, "eval") for p in (ROOT / "eval").glob("*.yaml")] + [(CONF_DIR / "train.yaml", "_global_")]
    files += [(p, "_global_") for d in ("experiments", "hparams_search") for p in (ROOT / d).glob("*.yaml")]
    for path, group in files:
        node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        package = _package(path, group)
        items = node.items() if package == "_global_" else [(package, node)]
        for name, sub in items:
            if isinstance(sub, dict) and name not in ("defaults", "hydra"):
                known.setdefault(name, set()).update(k for k in sub if k != "defaults")
            elif path == CONF_DIR / "train.yaml" and name not in ("defaults", "hydra"):
                known[""].add(name)  # a top-level knob of the primary config (optimized_metric, tuning_subjects)
    return {k: frozenset(v) for k, v in known.items()}


def _unknown(cfg: DictConfig) -> str | None:
    known = known_keys()
    for key in cfg:
        if key not in known[""]:
            return str(key)
        node = cfg[key]
        if isinstance(node, DictConfig) and key in known:
            extra = sorted(str(k) for k in node if k not in known[key])
            if extra:
                return f"{key}.{extra[0]}"
    return None


def check_config(cfg: DictConfig) -> None:
    """Types, limits and known keys of `cfg` (the composed train config); the first problem is a ZoodipError."""
    unknown = _unknown(cfg)
    if unknown:
        raise ZoodipError(
            f"unknown config key {unknown}: no zoodip config defines it; check its spelling "
            f"(python -m zoodip.runtime.train --help lists the keys)"
        )
    for key, knob in KNOBS.items():
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if (value is not None or _has(cfg, key)) and not knob.allows(value):
            raise ZoodipError(f"{key} must be {knob.describe()}, got {value!r}")
    betas = OmegaConf.select(cfg, "optimizer.betas", default=None)
    if betas is not None and (len(betas) != 2 or not all(BETA.allows(b) for b in betas)):
        raise ZoodipError(f"optimizer.betas must be two numbers in [0, 1), got {list(betas)!r}")


def _has(cfg: DictConfig, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None)
    return isinstance(node, DictConfig) and leaf in node
