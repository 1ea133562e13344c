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

from zoodip.errors import ZoodipError
from zoodip.method import cmastate
from zoodip.method.estimators import ESTIMATORS, Estimate, Estimator, EstimatorSettings, LossFn, direction_seeds
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


@dataclass(frozen=True)
class OptimizerSettings:
    """The `optimizer` config group, read once (zoodip.schema.method_settings)."""

    name: str = "adam"  # adam (ZO-Adam) | adamw (first-order TI) | sgd (ZO-SGD)
    lr: float = 5e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0  # sgd
    schedule: str = "constant"
    official_grad_scale: bool = False  # optimizer=zo_adam_official


@dataclass(frozen=True)
class GFTISettings:
    """The `method=gfti` config group (S1.5)."""

    intrinsic_dim: int = 256
    population: int = 30
    sigma: float = 1.0
    alpha: float = 1.0
    shared_sample: bool = True


@dataclass(frozen=True)
class MethodSettings:
    """Everything a method reads, typed: built once from the composed config by zoodip.schema.method_settings."""

    name: str  # the registry key: an estimator's name, or gfti
    estimator: EstimatorSettings
    optimizer: OptimizerSettings
    sg_tau: int | None  # Subspace Gradient's tau (Algorithm 2); None: SG off
    sg_nu: float
    steps: int  # L, Algorithm 1's number of steps
    seed: int  # drives the directions (and CMA-ES's sampling)
    gfti: GFTISettings | None = None


def make_optimizer(o: OptimizerSettings, theta: torch.nn.Parameter) -> torch.optim.Optimizer:
    """ZO-Adam / ZO-SGD / AdamW: torch's own optimizers fed the gradient through `.grad`."""
    if o.name == "adam":
        return torch.optim.Adam([theta], lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    if o.name == "adamw":  # first-order TI: diffusers' textual_inversion.py (weight decay on the token rows only)
        return torch.optim.AdamW([theta], lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    return torch.optim.SGD([theta], lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


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

    def __init__(self, settings: MethodSettings, theta: torch.nn.Parameter) -> None:
        self.settings, self.theta = settings, theta
        self.estimator = ESTIMATORS[settings.estimator.name](settings.estimator, theta.numel())
        self.autograd = self.estimator.autograd
        self.n = settings.estimator.n
        self.optimizer = make_optimizer(settings.optimizer, theta)
        tau = settings.sg_tau
        self.sg = SubspaceGradient(tau, settings.sg_nu, theta.numel()) if tau is not None else None

    def official_grad_scale(self) -> float:
        """optimizer=zo_adam_official: the official code divides Eq. 3's sum by sqrt((d_eff + n - 1) / n) * n
        instead of n, with d_eff = D minus the directions SG projects out; relative to Eq. 3 that is this factor."""
        removed = self.sg.projector.shape[0] if self.sg is not None else 0
        return 1.0 / math.sqrt((self.theta.numel() - removed + self.n - 1) / self.n)

    def estimate(self, loss_fn: LossFn, step: int) -> Estimate:
        """The gradient estimate of `step` at the current theta (directions regenerated from the step's seeds, MeZO's
        way); the estimator's own state is read, nothing is applied."""
        seeds = direction_seeds(self.settings.seed, step, self.n + 1)
        return self.estimator.estimate(loss_fn, self.theta.detach(), seeds)

    def step(self, loss_fn: LossFn, step: int) -> StepResult:
        theta, opt = self.theta, self.settings.optimizer
        est = self.estimate(loss_fn, step)
        grad = self.sg.project(est.grad) if self.sg is not None else est.grad
        if opt.official_grad_scale:
            grad = grad * self.official_grad_scale()
        finite = math.isfinite(est.loss) and bool(torch.isfinite(est.losses).all()) and bool(torch.isfinite(grad).all())
        if finite:
            before = theta.detach().clone()
            theta.grad = grad.to(theta.dtype)
            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate(opt.lr, opt.schedule, step, self.settings.steps)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.estimator.observe(theta.detach() - before, est)
        row = {
            "grad_norm": float(est.grad.norm()),
            "projected_grad_norm": float(grad.norm()),
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        istar = self.sg.observe(theta, step) if self.sg is not None else None
        if istar is not None:
            row["sg_istar_over_tau"] = istar / self.sg.tau
        row.update(self.estimator.log())
        return StepResult(est.loss, est.losses, finite, row, est.grad, grad)

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's and SG's state, and the estimator's own (`estimator_state`)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "sg": self.sg.state_dict() if self.sg is not None else None,
            "estimator": self.estimator.state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.sg is not None and state.get("sg") is not None:
            self.sg.load_state_dict(state["sg"])
        self.estimator.load_state([g.clone() for g in state.get("estimator") or []])


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

    def __init__(
        self, settings: MethodSettings, theta: torch.nn.Parameter, tables: list[torch.Tensor], num_vectors: int
    ) -> None:
        import cma

        if settings.gfti is None:
            raise ZoodipError("method=gfti needs its settings (method.population, intrinsic_dim, sigma, alpha)")
        m = settings.gfti
        self.theta, self.theta0 = theta, theta.detach().clone()
        self.shared_sample = m.shared_sample
        self.basis = pca_basis(tables, num_vectors, m.intrinsic_dim)
        if self.basis.shape[1] != theta.numel():
            raise ZoodipError(f"GF-TI's subspace has width {self.basis.shape[1]}, the token {theta.numel()}")
        self.scale = gfti_scale(tables, m.intrinsic_dim, m.alpha, m.sigma)
        never = {"maxiter": float("inf"), "tolfun": 0, "tolx": 0, "tolfunhist": 0, "tolstagnation": 10**9}
        options = {"popsize": m.population, "seed": settings.seed + 1, "verbose": -9, **never}
        # cma samples from numpy's global RNG, which it seeds: that stream is kept here, swapped in for cma only
        # (`own_rng`), so that a checkpoint holds it and nothing else in the process draws from it.
        outside = cmastate.numpy_rng_state()
        self.es = cma.CMAEvolutionStrategy(np.zeros(self.basis.shape[0]), m.sigma, options)
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
    passes: Callable[[MethodSettings], int]
    build: Callable[..., GradientMethod | CMAES]
    summary: str


def _gradient(settings: MethodSettings, theta: torch.nn.Parameter, tables: list[torch.Tensor], k: int):
    return GradientMethod(settings, theta)


def _estimator_method(estimator: type[Estimator]) -> MethodSpec:
    return MethodSpec(estimator.autograd, lambda s: estimator.passes(s.estimator.n), _gradient, estimator.summary)


#: Every way of learning the token: each estimator of zoodip/method/estimators.py inside Algorithm 1 (SG, the
#: optimizer), and GF-TI. zoodip-train, its config check and zoodip-bench read it.
METHODS: dict[str, MethodSpec] = {
    **{name: _estimator_method(estimator) for name, estimator in ESTIMATORS.items()},
    "gfti": MethodSpec(False, lambda s: s.gfti.population, CMAES, "GF-TI: CMA-ES in a PCA subspace"),
}


def build_method(settings: MethodSettings, theta: torch.nn.Parameter, tables: list[torch.Tensor], num_vectors: int):
    """The registry entry of `settings`, built around `theta` (tables: each text encoder's token-embedding table)."""
    return METHODS[settings.name].build(settings, theta, tables, num_vectors)
