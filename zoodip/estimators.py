"""Gradient estimators for the token theta (paper Sec. 3.2 and S2.1).

Each estimator takes `loss_fn`, which maps a batch of candidate tokens (m, D) to their losses (m,), all
evaluated at one step's shared latent, noise, timestep and prompt (common random numbers). Directions
e_i ~ N(0, I) are regenerated from integer seeds, as in MeZO: seeds are kept, direction vectors are not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

LossFn = Callable[[torch.Tensor], torch.Tensor]


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
    losses = loss_fn(candidates).float().cpu()
    grad = combine((losses[:n] - losses[n:]) / (2 * mu), seeds[:n], dim)
    return Estimate(grad, float(losses.mean()), losses, 2 * n)


def one_point(loss_fn: LossFn, theta: torch.Tensor, n: int, mu: float, seeds: list[int]) -> Estimate:
    """One-point residual estimate, Eq. S12: g = 1/n sum_i (L(theta + mu e_{i+1}) - L(theta + mu e_i)) / mu * e_i.

    Uses n + 1 directions e_1..e_{n+1} and n + 1 forward passes, none of them at theta itself.
    """
    dim = theta.numel()
    candidates = torch.stack([theta + mu * direction(s, dim) for s in seeds[: n + 1]])
    losses = loss_fn(candidates).float().cpu()
    grad = combine((losses[1:] - losses[:-1]) / mu, seeds[:n], dim)
    return Estimate(grad, float(losses.mean()), losses, n + 1)


def backprop(loss_fn: LossFn, theta: torch.Tensor) -> Estimate:
    """First-order Textual Inversion: the exact gradient of L(theta) by backpropagation (the paper's TI baseline)."""
    leaf = theta.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(leaf[None])[0]
        (grad,) = torch.autograd.grad(loss, leaf)
    loss = loss.detach().float().cpu()
    return Estimate(grad.detach().float().cpu(), loss.item(), loss[None], 1)


#: The zeroth-order estimators by `estimator` config name (backprop is the first-order one); zoodip/methods.py
#: turns each into a registry entry.
GRADIENT_ESTIMATORS = {"rge": rge, "spsa": spsa, "one_point": one_point}
