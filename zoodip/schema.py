"""The config, read in one place: every knob's type, limit and allowed choices, the rules between knobs, and the
typed settings everything below the entry points is built from.

`check_config` is the one validator: a wrong type, a value past its limit, an unknown choice, a key that no config file
defines or a broken rule between knobs (t_low < t_high, a method's needs) is one sentence naming the key (ZoodipError,
exit code 2), before anything is loaded or written. The checked config then becomes frozen dataclasses, once:
`method_settings` (the method layer, zoodip/method/), `loop_settings` (Algorithm 1's loop), `model_settings` (the
model loader), `data_settings` (the subject and its data) and `eval_settings` (the evaluation and the validation
during training).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from zoodip import CONF_DIR, ROOT
from zoodip.data.dataset import TEMPLATES, DataSettings, subject_table
from zoodip.errors import ZoodipError
from zoodip.evaluation.settings import ClipSettings, EvalSettings, GenerationSettings
from zoodip.method.estimators import EstimatorSettings
from zoodip.method.methods import METHODS, SCHEDULES, GFTISettings, MethodSettings, OptimizerSettings
from zoodip.method.objective import check_compile
from zoodip.method.timesteps import SAMPLERS
from zoodip.models.loading import ModelSettings, check_cpu_memory
from zoodip.models.quantize import QUANTIZATIONS

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
# puts.t_low / t_high is a rule between the two (`check_rules`: 0 <= t_low < t_high; <= the schedule's length once
# the model is loaded). Not listed: model.resolution (the model's own: a multiple of its downsampling).
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
    "puts.t_low": Knob(int),  # the type here; the range in check_rules, as a pair: 0 <= t_low < t_high
    "puts.t_high": Knob(int),
    "puts.stratified": Knob(bool),
    "estimator.smoothing": Knob(float, 0, 1, open_low=True),
    "estimator.clip": Knob(float, 1),
    "estimator.unbiased": Knob(bool),
    "estimator.k": Knob(int, 1),
    "estimator.alpha": Knob(float, 0, 1, open_low=True),
    "train.forward_budget": Knob(int, 1, nullable=True),
    "train.keep_tokens_every": Knob(int, 0),
    "train.grad_cosine_every": Knob(int, 0),
    "train.distributed": Knob(bool),
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
    "eval.images_per_prompt": Knob(int, 1),
    "eval.diversity_images": Knob(int, 0),
    "eval.batch_size": Knob(int, 1),
    "eval.num_inference_steps": Knob(int, 1),
    "eval.guidance_scale": Knob(float, 0),  # <= 1: no classifier-free guidance
    "eval.seed": Knob(int, 0, SEED_MAX),
    "eval.use_class_token": Knob(bool),
    "eval.living": Knob(bool, nullable=True),
    "eval.validation.prompts": Knob(int, 1),
    "eval.validation.images_per_prompt": Knob(int, 1),
}
BETA = Knob(float, 0, 1, open_high=True)
# Every knob with a fixed set of values, and the values.
CHOICES: dict[str, tuple[str, ...]] = {
    "method.name": tuple(METHODS),
    "puts.kind": SAMPLERS,
    "optimizer.name": ("adam", "adamw", "sgd"),
    "optimizer.schedule": SCHEDULES,
    "quantization.weights": QUANTIZATIONS,
    "data.kind": ("dreambooth", "planted"),
    "data.template": tuple(TEMPLATES),
    "eval.kind": ("dreambooth", "toyworld"),
    "eval.clip.backend": ("transformers", "open_clip"),
}
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
    """Types, limits, choices, known keys and the rules between knobs of `cfg` (the composed train config); the first
    problem is a ZoodipError."""
    check_knobs(cfg)
    check_rules(cfg)


def check_knobs(cfg: DictConfig, group: str | None = None) -> None:
    """Each knob alone: known keys, types, limits and choices; with `group` (e.g. "eval"), only that group's knobs
    (a finished run's config, re-read by zoodip-eval)."""
    unknown = _unknown(cfg) if group is None else None
    if unknown:
        raise ZoodipError(
            f"unknown config key {unknown}: no zoodip config defines it; check its spelling "
            f"(python -m zoodip.runtime.train --help lists the keys)"
        )
    for key, knob in KNOBS.items():
        if group is not None and not key.startswith(f"{group}."):
            continue
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if (value is not None or _has(cfg, key)) and not knob.allows(value):
            raise ZoodipError(f"{key} must be {knob.describe()}, got {value!r}")
    betas = OmegaConf.select(cfg, "optimizer.betas", default=None) if group in (None, "optimizer") else None
    if betas is not None and (len(betas) != 2 or not all(BETA.allows(b) for b in betas)):
        raise ZoodipError(f"optimizer.betas must be two numbers in [0, 1), got {list(betas)!r}")
    for key, options in CHOICES.items():
        if group is not None and not key.startswith(f"{group}."):
            continue
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if (value is not None or _has(cfg, key)) and value not in options:
            raise ZoodipError(f"{key} must be one of {', '.join(options)}, got {value!r}")


def check_rules(cfg: DictConfig) -> None:
    """The rules between knobs (each knob alone is checked by check_config): one sentence naming the key and the fix."""
    name, est, puts = method_name(cfg), cfg.estimator, cfg.puts
    schedule = cfg.optimizer.get("schedule", "constant")
    unquantized = (cfg.quantization.weights, cfg.quantization.get("others")) in (("none", "none"), ("none", None))
    if METHODS[name].autograd and not unquantized:
        raise ZoodipError(
            "estimator=backprop is the first-order TI baseline through an unquantized model: add quantization=none, "
            "which also keeps the text encoder and VAE unquantized (or use experiments=ti)"
        )
    if cfg.optimizer.get("official_grad_scale") and name in ("backprop", "gfti"):
        raise ZoodipError(f"optimizer=zo_adam_official scales a zeroth-order gradient; method {name!r} has none")
    if cfg.train.get("distributed") and METHODS[name].autograd:
        raise ZoodipError(
            "train.distributed spreads a step's forward passes over processes; first-order TI has one per step: "
            "run it with train.distributed=false"
        )
    if name == "gfti" and schedule != "constant":
        raise ZoodipError("optimizer.schedule is the gradient methods' learning rate; method=gfti (CMA-ES) has none")
    if name == "antithetic" and est.n % 2:
        raise ZoodipError(f"estimator=antithetic pairs +/- directions: estimator.n must be even, not {est.n}")
    if puts.get("stratified") and not (name in ("spsa", "antithetic") and puts.kind in ("puts", "uniform")):
        raise ZoodipError(
            "puts.stratified gives each +/- pair its own timestep, so that common random numbers still hold within "
            f"a pair: it needs estimator=spsa or antithetic with puts=puts or uniform, not {name} with {puts.kind}"
        )
    if puts.kind == "puts" and not 0 <= puts.t_low < puts.t_high:
        raise ZoodipError(f"puts.t_low must satisfy 0 <= t_low < t_high, got t_low={puts.t_low}, t_high={puts.t_high}")
    check_cpu_memory(cfg.train.cpu_memory)
    check_compile(cfg.train.compile, cfg.quantization.weights)


def method_name(cfg: DictConfig) -> str:
    """`method=gfti` names its method; `method=gradient` (the default) takes the estimator's name."""
    return str(cfg.method.name)


def method_settings(cfg: DictConfig) -> MethodSettings:
    """The method's knobs of a checked config as typed, frozen settings (the method layer reads nothing else)."""
    est, opt, m = cfg.estimator, cfg.optimizer, cfg.method
    estimator = EstimatorSettings(
        name=str(est.name),
        n=int(est.n),
        mu=float(est.mu),
        **{key: type(getattr(EstimatorSettings, key))(est[key]) for key in _OPTIONAL_ESTIMATOR if key in est},
    )
    optimizer = OptimizerSettings(
        name=str(opt.name),
        lr=float(opt.lr),
        betas=tuple(float(b) for b in opt.get("betas", (0.9, 0.999))),
        eps=float(opt.get("eps", 1e-8)),
        weight_decay=float(opt.get("weight_decay", 0.0)),
        momentum=float(opt.get("momentum", 0.0)),
        schedule=str(opt.get("schedule", "constant")),
        official_grad_scale=bool(opt.get("official_grad_scale", False)),
    )
    gfti = None
    if m.name == "gfti":
        gfti = GFTISettings(
            intrinsic_dim=int(m.intrinsic_dim),
            population=int(m.population),
            sigma=float(m.sigma),
            alpha=float(m.alpha),
            shared_sample=bool(m.shared_sample),
        )
    return MethodSettings(
        name=method_name(cfg),
        estimator=estimator,
        optimizer=optimizer,
        sg_tau=int(cfg.sg.tau) if cfg.sg.enabled else None,
        sg_nu=float(cfg.sg.nu),
        steps=int(cfg.train.steps),
        seed=int(cfg.train.seed),
        gfti=gfti,
    )


def model_settings(cfg: DictConfig) -> ModelSettings:
    """The `model` and `quantization` groups as the model loader takes them."""
    m, q = cfg.model, cfg.get("quantization") or {}
    weights = str(q.get("weights") or "none")
    return ModelSettings(
        arch=str(m.arch),
        init=str(m.get("init") or "pretrained"),
        path=_text(m.get("path")),
        dtype=str(m.get("dtype") or "auto"),
        seed=int(m.get("seed") or 0),
        resolution=int(m.resolution),
        weights=weights,
        others=str(q.get("others") or weights),  # runs from before quantization.others: as the U-Net
        dequantized_copy=q.get("dequantized_copy"),
    )


def initializer(cfg: DictConfig) -> tuple[str | None, str]:
    """The word whose embedding starts the token, and which key chose it: data.initializer_token, else the
    DreamBooth table's word for data.subject, else the model's own (model.initializer_token: one token of its
    tokenizer, e.g. the toy world's "object"); (None, "none") when none does (an older zoodip's run config)."""
    data, model = cfg.data, cfg.get("model") or {}
    if data.get("initializer_token"):
        return str(data.initializer_token), "data.initializer_token"
    row = subject_table().get(data.get("subject"))
    if row is not None:
        return row["initializer"], f"data.subject={data.subject}'s initializer (the DreamBooth table)"
    if model.get("initializer_token"):
        return str(model.initializer_token), "model.initializer_token"
    return None, "none"


def data_settings(cfg: DictConfig) -> DataSettings:
    """The `data` group: the subject, its images or the planted task, the placeholder and its initializer (a key
    that an older zoodip's run config lacks takes its default)."""
    d, dflt = cfg.data, DataSettings
    word, source = initializer(cfg)
    return DataSettings(
        kind=str(d.kind),
        subject=_text(d.get("subject")),
        path=_text(d.get("path")),
        placeholder=str(d.placeholder_token),
        initializer=word,
        initializer_source=source,
        num_vectors=int(d.get("num_vectors", dflt.num_vectors)),
        resolution=int(d.get("resolution") or cfg.model.resolution),
        flip_p=float(d.get("flip_p", dflt.flip_p)),
        init_embedding=_text(d.get("init_embedding")),
        allow_pickle=bool(d.get("allow_pickle", dflt.allow_pickle)),
        captions=_text(d.get("captions")),
        template=str(d.get("template") or dflt.template),
        planted_rank=int(d.get("planted_rank", dflt.planted_rank)),
        planted_scale=float(d.get("planted_scale", dflt.planted_scale)),
        num_images=int(d.get("num_images", dflt.num_images)),
        eval_points=int(d.get("eval_points", dflt.eval_points)),
        seed=int(d.get("seed", dflt.seed)),
    )


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def eval_settings(cfg: DictConfig) -> EvalSettings:
    """The `eval` group of a run's config (its defaults merged: zoodip.evaluation.evaluate.prepare_config), checked
    and typed."""
    check_knobs(cfg, "eval")
    ev = cfg.eval
    clip = ev.clip
    g = GenerationSettings(
        seed=int(ev.seed),
        num_inference_steps=int(ev.num_inference_steps),
        guidance_scale=float(ev.guidance_scale),
        batch_size=int(ev.batch_size),
        scheduler=_text(ev.scheduler),
    )
    return EvalSettings(
        kind=str(ev.kind),
        data=data_settings(cfg),
        model=model_settings(cfg),
        other_model=str(ev.model) if ev.get("model") else None,  # null or "": the run's own model
        generation=g,
        images_per_prompt=int(ev.images_per_prompt),
        diversity_images=int(ev.diversity_images),
        use_class_token=bool(ev.use_class_token),
        living=None if ev.living is None else bool(ev.living),
        class_noun=_text(ev.get("class_noun")),
        clip=ClipSettings(
            path=str(clip.path),
            backend=str(clip.backend),
            open_clip_model=clip.get("open_clip_model"),
            open_clip_pretrained=clip.get("open_clip_pretrained"),
        ),
        dino=str(ev.dino.path),
        scorer=_text(ev.get("scorer")),
        device=str(ev.get("device") or cfg.train.device),
        device_key="eval.device" if ev.get("device") else "train.device",  # unset: evaluate where training ran
        validation_prompts=int(ev.validation.prompts),
        validation_images_per_prompt=int(ev.validation.images_per_prompt),
        progress=bool(cfg.train.get("progress", True)),
    )


_OPTIONAL_ESTIMATOR = ("k", "alpha", "unbiased", "smoothing", "clip")


@dataclass(frozen=True)
class LoopSettings:
    """What Algorithm 1's loop reads of the run (the `train` group and two knobs of others), typed, read once."""

    steps: int  # L
    seed: int
    resume: str | None  # auto | null | a run folder
    progress: bool
    log_every: int
    save_every: int  # 0: only at the end
    checkpoint_every: int  # 0: never
    keep_tokens_every: int  # forward passes; 0: never
    grad_cosine_every: int  # 0: never
    max_nonfinite: int
    max_bad_steps: int
    stratified: bool  # puts.stratified
    validate_every: int  # eval.every: the cheap validation's period; 0: never
    quantization: str  # quantization.weights: how the forwards run (forward_mode)


def loop_settings(cfg: DictConfig) -> LoopSettings:
    t = cfg.train
    return LoopSettings(
        steps=int(t.steps),
        seed=int(t.seed),
        resume=None if t.resume is None else str(t.resume),
        progress=bool(t.progress),
        log_every=int(t.log_every),
        save_every=int(t.save_every),
        checkpoint_every=int(t.checkpoint_every),
        keep_tokens_every=int(t.keep_tokens_every),
        grad_cosine_every=int(t.grad_cosine_every),
        max_nonfinite=int(t.max_nonfinite),
        max_bad_steps=int(t.max_bad_steps),
        stratified=bool(cfg.puts.get("stratified")),
        validate_every=int(cfg.eval.every),
        quantization=str(cfg.quantization.weights),
    )


def _has(cfg: DictConfig, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None)
    return isinstance(node, DictConfig) and leaf in node
