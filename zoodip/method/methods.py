"""The method registry: one entry per way of learning the token. zoodip-train, its config check and zoodip-bench
all read `METHODS`.

A method turns `loss_fn` (a batch of candidate tokens (m, D) -> their losses (m,), all at one step's sample) into
an update of theta, in place. Two kinds:

* `GradientMethod`: Algorithm 1, lines 4-11. A gradient estimate (RGE Eq. 3, SPSA S11, one-point S12 as
  residual feedback, the estimators of zoodip/method/estimators.py beyond the paper, or the exact gradient by backprop:
  first-order TI), projected by Subspace Gradient (Eq. 8), fed to a torch optimizer;
  the updated token goes into SG's buffer (Algorithm 2).
* `CMAES`: Gradient-Free Textual Inversion (GF-TI, paper S1.5 and Table 1): CMA-ES from the `cma` package over
  a d_i-dimensional subspace of the token space; theta is the search distribution's mean mapped back.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from zoodip.errors import ZoodipError
from zoodip.method import cmastate
from zoodip.method.estimators import (
    GRADIENT_ESTIMATORS,
    Estimate,
    LossFn,
    backprop,
    direction_seeds,
    guided,
    hizoo,
    prgf,
)
from zoodip.method.subspace import SubspaceGradient

log = logging.getLogger("zoodip.method.methods")


@dataclass
class StepResult:
    """What one training step reports: the loss logged (L(theta) for RGE and backprop, else the mean of the
    evaluated losses), every loss evaluated, whether the update was applied, and the method's own log fields."""

    loss: float
    losses: torch.Tensor
    finite: bool
    log: dict[str, float] = field(default_factory=dict)
    estimate: torch.Tensor | None = None  # the raw gradient estimate (gradient methods), for diagnostics
    applied: torch.Tensor | None = None  # what went to the optimizer: the estimate after SG's projection


def make_optimizer(cfg: DictConfig, theta: torch.nn.Parameter) -> torch.optim.Optimizer:
    """ZO-Adam / ZO-SGD / AdamW: torch's own optimizers fed the gradient through `.grad`."""
    o = cfg.optimizer
    if o.name == "adam":
        return torch.optim.Adam(
            [theta], lr=float(o.lr), betas=tuple(o.betas), eps=float(o.eps), weight_decay=float(o.weight_decay)
        )
    if o.name == "adamw":  # first-order TI: diffusers' textual_inversion.py (weight decay on the token rows only)
        return torch.optim.AdamW(
            [theta], lr=float(o.lr), betas=tuple(o.betas), eps=float(o.eps), weight_decay=float(o.weight_decay)
        )
    return torch.optim.SGD([theta], lr=float(o.lr), momentum=float(o.momentum), weight_decay=float(o.weight_decay))


SCHEDULES = ("constant", "cosine")


def learning_rate(lr: float, schedule: str, step: int, steps: int) -> float:
    """The learning rate of update `step` (1-based) of `steps`. constant: lr, as the paper trains (Sec. 4; the official
    code builds a scheduler but never steps it). cosine: lr (1 + cos(pi (step - 1) / steps)) / 2, from lr at the first
    update towards 0 at the last (SGDR without restarts). A pure function of the step: a resumed run needs no state."""
    if schedule == "cosine":
        return lr * (1 + math.cos(math.pi * (step - 1) / steps)) / 2
    return lr


class GradientMethod:
    """Algorithm 1, lines 4-11, for one step: g_hat (`estimate`: Eq. 3 / S11 / S12 and the rest, or backprop),
    g' = SG(g_hat) (Eq. 8), theta <- optimizer(theta, g'), then theta into SG's buffer (lines 8-11, Algorithm 2)."""

    shared_sample = True  # every loss of a step at the same latent, noise, timestep and prompt

    def __init__(self, cfg: DictConfig, theta: torch.nn.Parameter) -> None:
        self.name, self.theta = cfg.estimator.name, theta
        self.autograd = self.name == "backprop"
        self.n, self.mu, self.seed = int(cfg.estimator.n), float(cfg.estimator.mu), int(cfg.train.seed)
        self.optimizer = make_optimizer(cfg, theta)
        self.lr, self.steps = float(cfg.optimizer.lr), int(cfg.train.steps)
        self.schedule = str(cfg.optimizer.get("schedule", "constant"))
        self.sg = SubspaceGradient(int(cfg.sg.tau), float(cfg.sg.nu), theta.numel()) if cfg.sg.enabled else None
        self.official_scale = bool(cfg.optimizer.get("official_grad_scale", False))
        est = cfg.estimator
        # estimator=guided: the last k updates of theta, whose span is U
        self.recent: list[torch.Tensor] = []
        self.k = int(est.get("k", 0)) if self.name == "guided" else 0
        self.alpha, self.unbiased = float(est.get("alpha", 1.0)), bool(est.get("unbiased", False))
        # estimator=prgf: the previous gradient estimate, the prior of History-PRGF (none before the first step)
        self.prior: torch.Tensor | None = None
        # estimator=hizoo: the running estimate of diag(H), HiZOO's Sigma^-1 up to scale (1 at the start: Sigma = I)
        self.hessian = torch.ones(theta.numel()) if self.name == "hizoo" else None
        self.smoothing, self.clip = float(est.get("smoothing", 0.0)), float(est.get("clip", 1.0))

    def guided_basis(self) -> torch.Tensor:
        """U (D, k'): orthonormal columns spanning the last k' <= k updates of theta (QR), Guided ES's surrogate
        gradients. Updates, not the estimates: Adam's updates average many steps, and with `unbiased` an estimate has
        its in-subspace part shrunk by alpha / (alpha + (1 - alpha) D / k), so a span of estimates drifts into noise."""
        if not self.recent:
            return torch.zeros(self.theta.numel(), 0)
        q, _ = torch.linalg.qr(torch.stack(self.recent, dim=1))
        return q

    def official_grad_scale(self) -> float:
        """optimizer=zo_adam_official: the official code divides Eq. 3's sum by sqrt((d_eff + n - 1) / n) * n
        instead of n, with d_eff = D minus the directions SG projects out; relative to Eq. 3 that is this factor."""
        removed = self.sg.projector.shape[0] if self.sg is not None else 0
        return 1.0 / math.sqrt((self.theta.numel() - removed + self.n - 1) / self.n)

    def estimate(self, loss_fn: LossFn, step: int) -> Estimate:
        """The gradient estimate of `step` at the current theta, from the estimator's state (guided's U, prgf's prior,
        hizoo's diag(H), which hizoo updates in place); nothing is applied."""
        theta = self.theta.detach()
        seeds = direction_seeds(self.seed, step, self.n + 1)
        if self.autograd:
            return backprop(loss_fn, theta)
        if self.name == "guided":
            return guided(loss_fn, theta, self.n, self.mu, seeds, self.guided_basis(), self.alpha, self.unbiased)
        if self.name == "prgf":
            prior = self.prior if self.prior is not None else torch.zeros(0)
            return prgf(loss_fn, theta, self.n, self.mu, seeds, prior)
        if self.name == "hizoo":
            return hizoo(loss_fn, theta, self.n, self.mu, seeds, self.hessian, self.smoothing, self.clip)
        return GRADIENT_ESTIMATORS[self.name](loss_fn, theta, self.n, self.mu, seeds)

    def step(self, loss_fn: LossFn, step: int) -> StepResult:
        theta = self.theta
        est = self.estimate(loss_fn, step)
        grad = self.sg.project(est.grad) if self.sg is not None else est.grad
        if self.official_scale:
            grad = grad * self.official_grad_scale()
        finite = math.isfinite(est.loss) and bool(torch.isfinite(est.losses).all()) and bool(torch.isfinite(grad).all())
        if finite:
            before = theta.detach().clone() if self.k else None
            theta.grad = grad.to(theta.dtype)
            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate(self.lr, self.schedule, step, self.steps)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if before is not None and float((update := theta.detach() - before).norm()) > 0:
                self.recent = [*self.recent, update / update.norm()][-self.k :]
            if self.name == "prgf":  # History-PRGF: this estimate (before SG's projection) is the next step's prior
                self.prior = est.grad.clone()
        row = {
            "grad_norm": float(est.grad.norm()),
            "projected_grad_norm": float(grad.norm()),
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        istar = self.sg.observe(theta, step) if self.sg is not None else None
        if istar is not None:
            row["sg_istar_over_tau"] = istar / self.sg.tau
        if self.hessian is not None:
            row["hessian_spread"] = float(self.hessian.max() / self.hessian.min())
        return StepResult(est.loss, est.losses, finite, row, est.grad, grad)

    def estimator_state(self) -> list[torch.Tensor]:
        """The estimator's own state, copied: guided's recent updates, prgf's previous estimate (none before the
        first step) or hizoo's diag(H) estimate (the checkpoint's `estimator` field)."""
        if self.hessian is not None:
            return [self.hessian.clone()]
        if self.name == "prgf":
            return [self.prior.clone()] if self.prior is not None else []
        return [g.clone() for g in self.recent]

    def load_estimator_state(self, own: list[torch.Tensor]) -> None:
        own = [g.clone() for g in own]
        if any(g.shape != (self.theta.numel(),) for g in own):
            raise ZoodipError(f"the checkpoint's estimator state is not of this token's size for estimator={self.name}")
        if self.hessian is not None:
            if len(own) != 1:
                raise ZoodipError("the checkpoint holds no diag(H) estimate of this token's size for estimator=hizoo")
            self.hessian = own[0]
        elif self.name == "prgf":
            self.prior = own[-1] if own else None
        else:
            self.recent = own

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's and SG's state, and the estimator's own (`estimator_state`)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "sg": self.sg.state_dict() if self.sg is not None else None,
            "estimator": self.estimator_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.sg is not None and state.get("sg") is not None:
            self.sg.load_state_dict(state["sg"])
        self.load_estimator_state(state.get("estimator") or [])


def pca_basis(tables: list[torch.Tensor], num_vectors: int, intrinsic_dim: int) -> torch.Tensor:
    """GF-TI's subspace: per text encoder, the top `intrinsic_dim` principal directions of its token-embedding
    table (V, d), one block per placeholder row; (k * sum_e d_i, D) with orthonormal rows within each block."""
    blocks = []
    for table in tables:
        centred = table.detach().double().cpu() - table.detach().double().cpu().mean(dim=0)
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        blocks += [vh[: min(intrinsic_dim, vh.shape[0])].float()] * num_vectors
    return torch.block_diag(*blocks)


def gfti_scale(tables: list[torch.Tensor], intrinsic_dim: int, alpha: float, sigma: float) -> float:
    """Maps z ~ N(0, sigma^2) to a change of the token whose per-coordinate spread is alpha times the embedding
    table's (GF-TI's own random projection has std alpha * std_hat / (sqrt(d_i) sigma) per entry, which gives
    exactly that; for an orthonormal basis of d_i of d directions the factor is alpha * std_hat * sqrt(d/d_i) / sigma).
    """
    flat = torch.cat([t.detach().float().cpu().flatten() for t in tables])
    width = tables[0].shape[1]
    return alpha * float(flat.std()) * math.sqrt(width / min(intrinsic_dim, width)) / sigma


class CMAES:
    """GF-TI (S1.5): each step is one CMA-ES generation. `population` candidates z ~ N(m, sigma^2 C) in the
    subspace become tokens theta_0 + scale * z B, are scored by the same loss (Eq. 1), and are told to CMA-ES;
    theta is then the mean (cma's `xfavorite`). GF-TI's own code keeps the best candidate of the last generation
    instead, a single noisy evaluation; the mean is the estimate CMA-ES itself recommends for noisy objectives.

    `shared_sample`: true scores all candidates of a generation at one latent, noise, timestep and prompt
    (common random numbers, as ZOODiP's estimators do); false gives each candidate its own latent, noise and
    prompt with the timestep shared, as GF-TI's own training script does.
    """

    autograd = False

    def __init__(self, cfg: DictConfig, theta: torch.nn.Parameter, tables: list[torch.Tensor], num_vectors: int):
        import cma

        m = cfg.method
        self.theta, self.theta0 = theta, theta.detach().clone()
        self.shared_sample = bool(m.shared_sample)
        self.basis = pca_basis(tables, num_vectors, int(m.intrinsic_dim))
        if self.basis.shape[1] != theta.numel():
            raise ZoodipError(f"GF-TI's subspace has width {self.basis.shape[1]}, the token {theta.numel()}")
        self.scale = gfti_scale(tables, int(m.intrinsic_dim), float(m.alpha), float(m.sigma))
        never = {"maxiter": float("inf"), "tolfun": 0, "tolx": 0, "tolfunhist": 0, "tolstagnation": 10**9}
        options = {"popsize": int(m.population), "seed": int(cfg.train.seed) + 1, "verbose": -9, **never}
        # cma samples from numpy's global RNG, which it seeds: that stream is kept here, swapped in for cma only
        # (`own_rng`), so that a checkpoint holds it and nothing else in the process draws from it.
        outside = cmastate.numpy_rng_state()
        self.es = cma.CMAEvolutionStrategy(np.zeros(self.basis.shape[0]), float(m.sigma), options)
        self.rng_state = cmastate.numpy_rng_state()
        np.random.set_state(outside)

    @contextlib.contextmanager
    def own_rng(self) -> Iterator[None]:
        outside = cmastate.numpy_rng_state()
        np.random.set_state(self.rng_state)
        try:
            yield
        finally:
            self.rng_state = cmastate.numpy_rng_state()
            np.random.set_state(outside)

    def token(self, z: np.ndarray | torch.Tensor) -> torch.Tensor:
        """theta_0 + scale * z B for one z (d_i,) or a batch (m, d_i)."""
        return self.theta0 + self.scale * torch.as_tensor(np.asarray(z), dtype=torch.float32) @ self.basis

    def step(self, loss_fn: LossFn, step: int) -> StepResult:
        with self.own_rng():
            candidates = self.es.ask()
        losses = loss_fn(self.token(np.stack(candidates))).float().cpu()
        finite = bool(torch.isfinite(losses).all())
        fitness = torch.nan_to_num(losses, nan=float("inf")).tolist()
        with self.own_rng():
            self.es.tell(candidates, fitness)  # non-finite losses rank last
        with torch.no_grad():
            self.theta.copy_(self.token(self.es.mean))
        row = {
            "population_loss_min": float(losses.min()),
            "population_loss_std": float(losses.std()),
            "cma_sigma": float(self.es.sigma),
        }
        return StepResult(float(losses.mean()), losses, finite, row)

    def state_dict(self) -> dict[str, Any]:
        """CMA-ES's whole state as tensors and JSON (`zoodip.method.cmastate`: mean, sigma, C and its
        eigendecomposition, evolution paths, counters, fitness history, the numpy RNG state): the checkpoint's `cma`
        field. There is no torch optimizer and no SG."""
        return {
            "optimizer": {"state": {}, "param_groups": []},
            "sg": None,
            "estimator": None,
            "cma": cmastate.snapshot(self.es, self.rng_state),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("cma") is None:
            raise ZoodipError("the checkpoint holds no CMA-ES state for method=gfti; start over with train.resume=null")
        self.rng_state = cmastate.restore(self.es, state["cma"])


@dataclass(frozen=True)
class MethodSpec:
    """One registry entry: whether it needs autograd, forward passes per step, and how it is built."""

    autograd: bool
    passes: Callable[[DictConfig], int]
    build: Callable[..., GradientMethod | CMAES]
    summary: str


def _gradient(cfg: DictConfig, theta: torch.nn.Parameter, tables: list[torch.Tensor], k: int) -> GradientMethod:
    return GradientMethod(cfg, theta)


def _n_plus_1(cfg: DictConfig) -> int:
    return int(cfg.estimator.n) + 1


METHODS: dict[str, MethodSpec] = {
    "rge": MethodSpec(False, _n_plus_1, _gradient, "ZOODiP's RGE (Eq. 3), SG, ZO-Adam"),
    "spsa": MethodSpec(False, lambda c: 2 * int(c.estimator.n), _gradient, "two-sided SPSA (Eq. S11), SG, ZO-Adam"),
    "one_point": MethodSpec(
        False, _n_plus_1, _gradient, "one-point residual feedback (Eq. S12, times e_{i+1}: Zhang et al.), SG, ZO-Adam"
    ),
    "antithetic": MethodSpec(False, _n_plus_1, _gradient, "antithetic RGE (+/- pairs sharing L(theta)), SG, ZO-Adam"),
    "guided": MethodSpec(
        False, _n_plus_1, _gradient, "Guided ES (N(0, Sigma) along recent updates; mean Sigma grad), SG, ZO-Adam"
    ),
    "hizoo": MethodSpec(
        False,
        lambda c: 2 * int(c.estimator.n) + 1,
        _gradient,
        "HiZOO-style diagonal-curvature RGE (+/- pairs, diag(H) EMA), SG, ZO-Adam",
    ),
    "prgf": MethodSpec(
        False, _n_plus_1, _gradient, "History-PRGF (previous estimate as prior + n-1 random), SG, ZO-Adam"
    ),
    "backprop": MethodSpec(True, lambda c: 1, _gradient, "first-order Textual Inversion (backprop)"),
    "gfti": MethodSpec(False, lambda c: int(c.method.population), CMAES, "GF-TI: CMA-ES in a PCA subspace"),
}


def method_name(cfg: DictConfig) -> str:
    """`method=gfti` names its method; `method=gradient` (the default) takes the estimator's name."""
    return str(cfg.method.name)


def build_method(cfg: DictConfig, theta: torch.nn.Parameter, tables: list[torch.Tensor], num_vectors: int):
    """The registry entry of `cfg`, built around `theta` (tables: each text encoder's token-embedding table)."""
    return METHODS[method_name(cfg)].build(cfg, theta, tables, num_vectors)
