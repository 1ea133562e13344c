"""Gradient estimators for the token theta (paper Sec. 3.2 and S2.1).

Each estimator takes `loss_fn`, which maps a batch of candidate tokens (m, D) to their losses (m,), all
evaluated at one step's shared latent, noise, timestep and prompt (common random numbers). Directions
e_i ~ N(0, I) are regenerated from integer seeds, as in MeZO: seeds are kept, direction vectors are not.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from zoodip.errors import ZoodipError

#: (candidates (m, D), groups) -> losses (m,). `groups` (one int per candidate, or None) marks evaluations that must
#: share a timestep; with puts.stratified each group gets its own stratum of [T_L, T_U) (train.py: training_step).
LossFn = Callable[..., torch.Tensor]


@dataclass
class Estimate:
    grad: torch.Tensor  # (D,) fp32
    loss: float  # L(theta) for RGE and backprop; the mean of the evaluated losses otherwise
    losses: torch.Tensor  # every loss evaluated this step
    forward_passes: int


def direction(seed: int, dim: int) -> torch.Tensor:
    """e ~ N(0, I_dim), a pure function of `seed` (CPU generator, so identical on every device)."""
    return torch.randn(dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def direction_seeds(base_seed: int, step: int, count: int) -> list[int]:
    """Distinct, reproducible seeds for the `count` directions of one step."""
    return [(base_seed * 1_000_003 + step * 4_099 + i) % (2**63 - 1) for i in range(count)]


def combine(coefficients: torch.Tensor, seeds: list[int], dim: int) -> torch.Tensor:
    """(1/n) sum_i c_i e_i with each e_i regenerated from its seed."""
    grad = torch.zeros(dim, dtype=torch.float32)
    for c, seed in zip(coefficients.tolist(), seeds, strict=True):
        grad.add_(direction(seed, dim), alpha=c)
    return grad / len(seeds)


def rge(loss_fn: LossFn, theta: torch.Tensor, n: int, mu: float, seeds: list[int]) -> Estimate:
    """Random Gradient Estimation, Eq. 3 (= S10): g = 1/n sum_i (L(theta + mu e_i) - L(theta)) / mu * e_i.

    n + 1 forward passes: L(theta) once, then one per direction.
    """
    dim = theta.numel()
    candidates = torch.stack([theta] + [theta + mu * direction(s, dim) for s in seeds[:n]])
    losses = loss_fn(candidates).float().cpu()
    grad = combine((losses[1:] - losses[0]) / mu, seeds[:n], dim)
    return Estimate(grad, float(losses[0]), losses, n + 1)


def spsa(loss_fn: LossFn, theta: torch.Tensor, n: int, mu: float, seeds: list[int]) -> Estimate:
    """Two-sided SPSA, Eq. S11: g = 1/n sum_i (L(theta + mu e_i) - L(theta - mu e_i)) / (2 mu) * e_i.  2n passes."""
    dim = theta.numel()
    dirs = [direction(s, dim) for s in seeds[:n]]
    candidates = torch.stack([theta + mu * e for e in dirs] + [theta - mu * e for e in dirs])
    losses = loss_fn(candidates, groups=list(range(n)) * 2).float().cpu()  # each +/- pair shares its sample
    grad = combine((losses[:n] - losses[n:]) / (2 * mu), seeds[:n], dim)
    return Estimate(grad, float(losses.mean()), losses, 2 * n)


def one_point(loss_fn: LossFn, theta: torch.Tensor, n: int, mu: float, seeds: list[int]) -> Estimate:
    """One-point residual-feedback estimate (Zhang et al. 2022, "A new one-point residual-feedback oracle for
    black-box learning and control", Automatica), the paper's Eq. S12 with the residual multiplied by the newer
    direction:

        g = 1/n sum_i (L(theta + mu e_{i+1}) - L(theta + mu e_i)) / mu * e_{i+1}

    E[g] = grad: L(theta + mu e_i) does not depend on e_{i+1}, so it only adds variance. Eq. S12 as printed
    multiplies by e_i instead, the direction of the *older* evaluation; then E[g] = -grad (the mean estimate points
    uphill; the old zoodip did that, and diverged: RESULTS.md §4.2). n + 1 directions e_1..e_{n+1}, n + 1 forward
    passes, none of them at theta itself.
    """
    dim = theta.numel()
    candidates = torch.stack([theta + mu * direction(s, dim) for s in seeds[: n + 1]])
    losses = loss_fn(candidates).float().cpu()
    grad = combine((losses[1:] - losses[:-1]) / mu, seeds[1 : n + 1], dim)
    return Estimate(grad, float(losses.mean()), losses, n + 1)


def antithetic(loss_fn: LossFn, theta: torch.Tensor, n: int, mu: float, seeds: list[int]) -> Estimate:
    """Antithetic RGE: n/2 directions, each evaluated at theta + mu e_i and theta - mu e_i, with L(theta)
    shared: g = (2/n) sum_i (L(theta + mu e_i) - L(theta - mu e_i)) / (2 mu) * e_i.

    n + 1 forward passes, as RGE's Eq. 3 (n even). The central difference cancels the second-order term that biases
    Eq. 3's forward difference; on a quadratic loss it is exactly (grad . e_i) e_i.
    """
    if n % 2:
        raise ValueError(f"antithetic RGE needs an even n (pairs of +/- directions), got {n}")
    dim, half = theta.numel(), n // 2
    dirs = [direction(s, dim) for s in seeds[:half]]
    candidates = torch.stack([theta] + [theta + mu * e for e in dirs] + [theta - mu * e for e in dirs])
    losses = loss_fn(candidates, groups=[0] + list(range(half)) * 2).float().cpu()
    grad = combine((losses[1 : half + 1] - losses[half + 1 :]) / (2 * mu), seeds[:half], dim)
    return Estimate(grad, float(losses[0]), losses, n + 1)


def guided_directions(seeds: list[int], basis: torch.Tensor, alpha: float) -> torch.Tensor:
    """e_i ~ N(0, Sigma), Sigma = alpha I + (1 - alpha) (D / k) U U^T, for U (D, k) with orthonormal columns: Guided
    ES's covariance (alpha / D) I + ((1 - alpha) / k) U U^T (Maheswaranathan et al. 2019, trace 1) times D, so that
    E|e|^2 = D as for RGE's N(0, I). e = sqrt(alpha) eps_D + sqrt((1 - alpha) D / k) U eps_k, both regenerated from
    the seed."""
    dim, k = basis.shape
    out = []
    for s in seeds:
        e = math.sqrt(alpha) * direction(s, dim)
        if k:
            e = e + math.sqrt((1 - alpha) * dim / k) * (basis @ direction(s + 7_919, k))
        out.append(e)
    return torch.stack(out)


def guided_inverse(vector: torch.Tensor, basis: torch.Tensor, alpha: float) -> torch.Tensor:
    """Sigma^-1 v = (v - U U^T v) / alpha + U U^T v / (alpha + (1 - alpha) D / k), Sigma as in `guided_directions`."""
    dim, k = basis.shape
    if not k:
        return vector / alpha
    inside = basis @ (basis.T @ vector)
    return (vector - inside) / alpha + inside / (alpha + (1 - alpha) * dim / k)


def guided(
    loss_fn: LossFn,
    theta: torch.Tensor,
    n: int,
    mu: float,
    seeds: list[int],
    basis: torch.Tensor,
    alpha: float,
    unbiased: bool = False,
) -> Estimate:
    """Guided evolutionary strategies (Maheswaranathan et al. 2019, arXiv 1806.10230, Algorithm 1): directions
    e_i ~ N(0, Sigma) drawn partly from U, the span of the last k updates of theta (`guided_directions`), and

        g = 1/n sum_i (L(theta + mu e_i) - L(theta)) / mu * e_i          E[g] = Sigma grad (biased towards U)

    as published: no Sigma^-1 correction, a gradient scaled up inside U. In the paper's terms this is beta = D with
    its trace-1 Sigma and sigma = mu sqrt(D), the scale at which alpha = 1 is RGE's Eq. 3 exactly. `unbiased`
    multiplies g by Sigma^-1, so that E[g] = Sigma^-1 Sigma grad = grad (zoodip's earlier variant; it multiplies the
    noise outside U by 1 / alpha).

    A departure from the published algorithm, kept on purpose: the paper evaluates antithetic pairs
    L(theta + mu e_i) - L(theta - mu e_i) (2n passes for n directions); this is the forward difference against one
    shared L(theta), n + 1 passes for n directions, the budget of RGE and of every other candidate at n = 2 (three
    passes). On a quadratic both have the same mean (E[(e^T H e) e] = 0 for a symmetric e), and at the same budget
    the forward difference has twice the directions; `estimator=antithetic` is the paired estimate with N(0, I)."""
    dirs = guided_directions(seeds[:n], basis, alpha)
    losses = loss_fn(torch.cat([theta[None], theta + mu * dirs])).float().cpu()
    grad = ((losses[1:] - losses[0]) / mu) @ dirs / n
    if unbiased:
        grad = guided_inverse(grad, basis, alpha)
    return Estimate(grad, float(losses[0]), losses, n + 1)


def hizoo(
    loss_fn: LossFn,
    theta: torch.Tensor,
    n: int,
    mu: float,
    seeds: list[int],
    hessian: torch.Tensor,
    smoothing: float,
    clip: float,
) -> Estimate:
    """Diagonal-curvature RGE in the manner of HiZOO (Zhao et al. 2024, arXiv 2402.15173, Alg. 1). `hessian` h (D,)
    is a running estimate of diag(H); the perturbations are preconditioned by Sigma = diag(mean(h) / h), clipped to
    [1/clip, clip] (HiZOO uses Sigma = diag(h)^-1 itself; normalizing by mean(h) keeps mu * Sigma^1/2 u on RGE's
    scale, so mu and lr keep their meaning). With u_i ~ N(0, I), and L_0, L_i+, L_i- the losses at theta and
    theta +/- mu Sigma^1/2 u_i:

        g = 1/n sum_i (L_i+ - L_i-) / (2 mu) * Sigma^1/2 u_i                      E[g] = Sigma grad (a Newton-like step)
        h_hat = 1/n sum_i (L_i+ + L_i- - 2 L_0) / (2 mu^2) * (u_i^2 - 1) / Sigma   E[h_hat] = diag(H) on a quadratic
        h <- (1 - smoothing) h + smoothing |h_hat|                                    (HiZOO's EMA of |diag|)

    `hessian` is updated in place; 2n + 1 forward passes (n = 1: three, ZOODiP's count)."""
    dim = theta.numel()
    sigma = (hessian.mean() / hessian).clamp(1 / clip, clip)
    dirs = torch.stack([direction(s, dim) for s in seeds[:n]])
    steps = mu * sigma.sqrt() * dirs
    losses = loss_fn(torch.cat([theta[None], theta + steps, theta - steps])).float().cpu()
    plus, minus = losses[1 : n + 1], losses[n + 1 :]
    grad = (((plus - minus) / (2 * mu)) @ dirs) * sigma.sqrt() / n
    curvature = (((plus + minus - 2 * losses[0]) / (2 * mu**2)) @ (dirs**2 - 1)) / sigma / n
    if torch.isfinite(curvature).all():
        hessian.mul_(1 - smoothing).add_(curvature.abs(), alpha=smoothing)
    return Estimate(grad, float(losses[0]), losses, 2 * n + 1)


def prgf(loss_fn: LossFn, theta: torch.Tensor, n: int, mu: float, seeds: list[int], prior: torch.Tensor) -> Estimate:
    """Prior-guided random gradient-free estimate with the historical prior (History-PRGF: Cheng et al. 2019,
    "Improving black-box adversarial attacks with a transfer-based prior"; Meier et al. 2019; its convergence in
    Cheng et al. 2021, arXiv 2107.10110): `prior` v is the previous step's gradient estimate, and g is built from the
    directional derivatives along an orthonormal set u_1 = v / |v| and u_2..u_n (Gaussian, orthonormalized against v
    and each other),

        g = sum_i (L(theta + mu u_i) - L(theta)) / mu * u_i,

    the projection of the gradient onto span(u_1..u_n): E[g] = (grad . u_1) u_1 + (n - 1) / (D - 1) times the rest of
    grad. Biased (a projection, like SG, but along the trajectory's own estimate of the gradient where SG removes
    directions); with no prior yet (the first step) u_1 is random too. n + 1 forward passes."""
    dim = theta.numel()
    columns = [prior / prior.norm()] if prior.numel() and float(prior.norm()) > 0 else []
    columns += [direction(s, dim) for s in seeds[: n - len(columns)]]
    basis, _ = torch.linalg.qr(torch.stack(columns, dim=1))  # (D, n); QR keeps u_1 along v (up to sign)
    dirs = basis.T.contiguous()
    losses = loss_fn(torch.cat([theta[None], theta + mu * dirs])).float().cpu()
    grad = ((losses[1:] - losses[0]) / mu) @ dirs
    return Estimate(grad, float(losses[0]), losses, n + 1)


def backprop(loss_fn: LossFn, theta: torch.Tensor) -> Estimate:
    """First-order Textual Inversion: the exact gradient of L(theta) by backpropagation (the paper's TI baseline)."""
    leaf = theta.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(leaf[None])[0]
        (grad,) = torch.autograd.grad(loss, leaf)
    loss = loss.detach().float().cpu()
    return Estimate(grad.detach().float().cpu(), loss.item(), loss[None], 1)


@dataclass(frozen=True)
class EstimatorSettings:
    """The `estimator` config group, read once (zoodip.schema.method_settings); each estimator takes what it uses."""

    name: str = "rge"
    n: int = 2  # directions per step (Eq. 3's n)
    mu: float = 1e-3  # the perturbation's scale (Eq. 3's mu)
    k: int = 8  # guided: how many recent updates span U
    alpha: float = 0.5  # guided: the isotropic share of the directions' covariance
    unbiased: bool = False  # guided: multiply by Sigma^-1 so that the mean is the gradient
    smoothing: float = 1e-2  # hizoo: the EMA weight of each step's |diag(H)| estimate
    clip: float = 10.0  # hizoo: Sigma clipped to [1/clip, clip]


class Estimator:
    """One interface for every estimator: `estimate` turns one step's losses into g_hat, `observe` sees the update
    that was applied (the state of guided, prgf), and `state` / `load_state` carry that state through a checkpoint.
    The stateless ones are the functions above; a subclass names its function, its passes per step and a summary."""

    autograd = False  # first-order TI: the loss must be differentiable (an unquantized model)
    summary = ""

    def __init__(self, settings: EstimatorSettings, dim: int) -> None:
        self.settings, self.dim = settings, dim

    @staticmethod
    def passes(n: int) -> int:
        """Forward passes per step with n directions."""
        return n + 1

    def estimate(self, loss_fn: LossFn, theta: torch.Tensor, seeds: list[int]) -> Estimate:
        s = self.settings
        return type(self).function(loss_fn, theta, s.n, s.mu, seeds)

    def observe(self, update: torch.Tensor, estimate: Estimate) -> None:
        """After an applied step: `update` is theta's change, `estimate` the step's (before SG's projection)."""

    def log(self) -> dict[str, float]:
        """The estimator's own fields for the step's log row."""
        return {}

    def state(self) -> list[torch.Tensor]:
        return []

    def load_state(self, own: list[torch.Tensor]) -> None:
        if any(g.shape != (self.dim,) for g in own):
            raise ZoodipError(f"the checkpoint's estimator state is not of this token's size for {self.settings.name}")


class RGE(Estimator):
    function = staticmethod(rge)
    summary = "ZOODiP's RGE (Eq. 3), SG, ZO-Adam"


class SPSA(Estimator):
    function = staticmethod(spsa)
    summary = "two-sided SPSA (Eq. S11), SG, ZO-Adam"

    @staticmethod
    def passes(n: int) -> int:
        return 2 * n


class OnePoint(Estimator):
    function = staticmethod(one_point)
    summary = "one-point residual feedback (Eq. S12, times e_{i+1}: Zhang et al.), SG, ZO-Adam"


class Antithetic(Estimator):
    function = staticmethod(antithetic)
    summary = "antithetic RGE (+/- pairs sharing L(theta)), SG, ZO-Adam"


class Backprop(Estimator):
    autograd = True
    summary = "first-order Textual Inversion (backprop)"

    @staticmethod
    def passes(n: int) -> int:
        return 1

    def estimate(self, loss_fn: LossFn, theta: torch.Tensor, seeds: list[int]) -> Estimate:
        return backprop(loss_fn, theta)


class Guided(Estimator):
    """Guided ES with its state: the last k updates of theta (unit vectors), whose span is U."""

    summary = "Guided ES (N(0, Sigma) along recent updates; mean Sigma grad), SG, ZO-Adam"

    def __init__(self, settings: EstimatorSettings, dim: int) -> None:
        super().__init__(settings, dim)
        self.recent: list[torch.Tensor] = []

    def basis(self) -> torch.Tensor:
        """U (D, k'): orthonormal columns spanning the last k' <= k updates of theta (QR), Guided ES's surrogate
        gradients. Updates, not the estimates: Adam's updates average many steps, and with `unbiased` an estimate has
        its in-subspace part shrunk by alpha / (alpha + (1 - alpha) D / k), so a span of estimates drifts into noise."""
        if not self.recent:
            return torch.zeros(self.dim, 0)
        q, _ = torch.linalg.qr(torch.stack(self.recent, dim=1))
        return q

    def estimate(self, loss_fn: LossFn, theta: torch.Tensor, seeds: list[int]) -> Estimate:
        s = self.settings
        return guided(loss_fn, theta, s.n, s.mu, seeds, self.basis(), s.alpha, s.unbiased)

    def observe(self, update: torch.Tensor, estimate: Estimate) -> None:
        if self.settings.k > 0 and float(update.norm()) > 0:
            self.recent = [*self.recent, update / update.norm()][-self.settings.k :]

    def state(self) -> list[torch.Tensor]:
        return [g.clone() for g in self.recent]

    def load_state(self, own: list[torch.Tensor]) -> None:
        super().load_state(own)
        self.recent = [g.clone() for g in own]


class PRGF(Estimator):
    """History-PRGF with its state: the previous gradient estimate, the next step's prior (none before the first)."""

    summary = "History-PRGF (previous estimate as prior + n-1 random), SG, ZO-Adam"

    def __init__(self, settings: EstimatorSettings, dim: int) -> None:
        super().__init__(settings, dim)
        self.prior: torch.Tensor | None = None

    def estimate(self, loss_fn: LossFn, theta: torch.Tensor, seeds: list[int]) -> Estimate:
        s = self.settings
        return prgf(loss_fn, theta, s.n, s.mu, seeds, self.prior if self.prior is not None else torch.zeros(0))

    def observe(self, update: torch.Tensor, estimate: Estimate) -> None:
        self.prior = estimate.grad.clone()  # the estimate before SG's projection

    def state(self) -> list[torch.Tensor]:
        return [self.prior.clone()] if self.prior is not None else []

    def load_state(self, own: list[torch.Tensor]) -> None:
        super().load_state(own)
        self.prior = own[-1].clone() if own else None


class HiZOO(Estimator):
    """HiZOO-style RGE with its state: the running estimate of diag(H) (1 at the start: Sigma = I)."""

    summary = "HiZOO-style diagonal-curvature RGE (+/- pairs, diag(H) EMA), SG, ZO-Adam"

    def __init__(self, settings: EstimatorSettings, dim: int) -> None:
        super().__init__(settings, dim)
        self.hessian = torch.ones(dim)

    @staticmethod
    def passes(n: int) -> int:
        return 2 * n + 1

    def estimate(self, loss_fn: LossFn, theta: torch.Tensor, seeds: list[int]) -> Estimate:
        s = self.settings
        return hizoo(loss_fn, theta, s.n, s.mu, seeds, self.hessian, s.smoothing, s.clip)

    def log(self) -> dict[str, float]:
        return {"hessian_spread": float(self.hessian.max() / self.hessian.min())}

    def state(self) -> list[torch.Tensor]:
        return [self.hessian.clone()]

    def load_state(self, own: list[torch.Tensor]) -> None:
        super().load_state(own)
        if len(own) != 1:
            raise ZoodipError("the checkpoint holds no diag(H) estimate of this token's size for estimator=hizoo")
        self.hessian = own[0].clone()


#: Every estimator by its `estimator` config name; zoodip/method/methods.py makes each a method, and
#: tests/test_estimator_properties.py checks every entry's mean estimate against theory.
ESTIMATORS: dict[str, type[Estimator]] = {
    "rge": RGE,
    "spsa": SPSA,
    "one_point": OnePoint,
    "antithetic": Antithetic,
    "guided": Guided,
    "hizoo": HiZOO,
    "prgf": PRGF,
    "backprop": Backprop,
}
