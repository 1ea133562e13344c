"""Subspace Gradient (SG): paper Sec. 3.3, Eq. 4-8, Algorithm 1 lines 6-11 and Algorithm 2."""

from __future__ import annotations

import torch


def subspace_projector(buffer: torch.Tensor, nu: float) -> tuple[torch.Tensor, int]:
    """Algorithm 2 (update P_nu) on a trajectory buffer B of shape (tau, d). Returns (P_nu, i*).

    Eq. 4: standardize each feature, B_bar = (B - mean_B) / std_B (a zero-variance feature is left at 0).
    Eq. 5: B_bar = U S V^T, lambda_i = S_ii^2.
    Eq. 6: i* = the smallest i in 1..tau with sum_{j<=i} lambda_j / sum_k lambda_k > 1 - nu.
    Eq. 7: P_nu = V_{(i*+1):tau}^T, the directions of the remaining (smallest) variance, as rows.
    A buffer with no variance at all carries no information: nothing is projected out and i* = tau.
    """
    tau = buffer.shape[0]
    b = buffer.double()
    std = b.std(dim=0)
    b_bar = (b - b.mean(dim=0)) / torch.where(std > 0, std, torch.ones_like(std))
    _, s, vh = torch.linalg.svd(b_bar, full_matrices=False)
    lam = s**2
    total = lam.sum()
    if total <= 0:
        return buffer.new_zeros(0, buffer.shape[1]), tau
    ratio = torch.cumsum(lam, 0) / total
    above = torch.nonzero(ratio > 1 - nu)
    istar = int(above[0]) + 1 if len(above) else len(lam)
    rows = vh[istar:]
    # Fresh row-major storage: LAPACK hands V^T back column-major, and a projector with other strides makes BLAS
    # sum Eq. 8's products in another order than the same projector reloaded from a checkpoint (resume not exact).
    return torch.empty(rows.shape, dtype=buffer.dtype).copy_(rows), istar


def project_out(grad: torch.Tensor, projector: torch.Tensor) -> torch.Tensor:
    """Eq. 8: g' = g (I - P_nu^T P_nu), computed as g - (g P_nu^T) P_nu without forming the d x d matrix."""
    if projector.numel() == 0:
        return grad
    return grad - (grad @ projector.T) @ projector


class SubspaceGradient:
    """The SG state of Algorithm 1: a buffer of the last tau token iterates and the current P_nu.

    `observe(theta, step)` is lines 8-11: store the updated token at B[step mod tau] and, every tau
    steps, refresh P_nu from the full buffer (Algorithm 2). `project(g)` is line 6 (Eq. 8). Because every
    slot is rewritten between two refreshes, this equals the paper's "clear the buffer after each refresh".
    """

    def __init__(self, tau: int, nu: float, dim: int) -> None:
        self.tau, self.nu = tau, nu
        self.buffer = torch.zeros(tau, dim)
        self.projector = torch.zeros(0, dim)
        self.istar_history: list[tuple[int, int]] = []  # (step, i*) at every refresh: the paper's Fig. 8

    def project(self, grad: torch.Tensor) -> torch.Tensor:
        return project_out(grad, self.projector)

    def observe(self, theta: torch.Tensor, step: int) -> int | None:
        """Record the token after update `step` (1-based); return i* when this step refreshed P_nu."""
        self.buffer[step % self.tau] = theta.detach().float().cpu()
        if step % self.tau != 0:
            return None
        self.projector, istar = subspace_projector(self.buffer, self.nu)
        self.istar_history.append((step, istar))
        return istar

    def state_dict(self) -> dict:
        return {"buffer": self.buffer.clone(), "projector": self.projector.clone(), "istar": list(self.istar_history)}

    def load_state_dict(self, state: dict) -> None:
        self.buffer = state["buffer"].clone()
        self.projector = state["projector"].clone()
        self.istar_history = [tuple(x) for x in state["istar"]]
