"""Subspace Gradient: Algorithm 2 and Eq. 4-8 against hand computations."""

import numpy as np
import torch

from zoodip.method.subspace import SubspaceGradient, project_out, subspace_projector


def by_hand(buffer: np.ndarray, nu: float):
    mean, std = buffer.mean(0), buffer.std(0, ddof=1)
    std[std == 0] = 1.0
    b = (buffer - mean) / std
    _, s, vt = np.linalg.svd(b, full_matrices=False)
    lam = s**2
    ratio = np.cumsum(lam) / lam.sum()
    istar = int(np.argmax(ratio > 1 - nu)) + 1
    return vt[istar:], istar


def test_projector_matches_hand_computation():
    rng = np.random.default_rng(0)
    buffer = rng.normal(size=(6, 10)) * np.array([5, 3, 1, 0.5, 0.1, 1, 1, 1, 1, 1])
    rank = buffer.shape[0] - 1  # centering removes one dimension: the last singular value is 0
    for nu in (0.5, 0.1, 1e-3):
        p, istar = subspace_projector(torch.tensor(buffer, dtype=torch.float32), nu)
        p_hand, istar_hand = by_hand(buffer, nu)
        assert istar == istar_hand
        assert p.shape == (buffer.shape[0] - istar, buffer.shape[1])  # rows i*+1..tau (Eq. 7)
        # Singular vectors are defined up to sign, so compare projections P^T P over the rows with a nonzero
        # singular value (the row for the zero one is any unit vector orthogonal to the rest).
        a, b = p.numpy()[: rank - istar], p_hand[: rank - istar]
        np.testing.assert_allclose(a.T @ a, b.T @ b, atol=1e-5)


def test_istar_is_the_smallest_index_exceeding_one_minus_nu():
    # three orthogonal directions with variances 100 : 10 : 1 (standardization keeps each feature's share)
    buffer = torch.zeros(4, 3)
    buffer[:, 0] = torch.tensor([1.0, -1.0, 0.0, 0.0]) * 10
    buffer[:, 1] = torch.tensor([0.0, 0.0, 1.0, -1.0])
    # each column standardizes to the same variance: lambda equal => cumulative ratios 1/2, 1 (third col constant)
    p, istar = subspace_projector(buffer, nu=0.6)  # 1/2 > 0.4 -> i* = 1
    assert istar == 1
    _, istar = subspace_projector(buffer, nu=0.4)  # needs > 0.6 -> i* = 2
    assert istar == 2


def test_zero_variance_features_are_guarded():
    buffer = torch.randn(5, 4)
    buffer[:, 2] = 3.0  # constant feature: std 0
    p, istar = subspace_projector(buffer, 1e-3)
    assert torch.isfinite(p).all() and 1 <= istar <= 5


def test_constant_buffer_projects_nothing():
    p, istar = subspace_projector(torch.ones(4, 6), 1e-3)
    assert p.shape == (0, 6) and istar == 4
    g = torch.randn(6)
    assert torch.equal(project_out(g, p), g)


def test_eq8_removes_exactly_the_projector_rows():
    q, _ = torch.linalg.qr(torch.randn(8, 3))
    p = q.T  # 3 orthonormal rows
    g = torch.randn(8)
    g2 = project_out(g, p)
    torch.testing.assert_close(p @ g2, torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(g2, g @ (torch.eye(8) - p.T @ p))


def test_low_rank_trajectory_keeps_planted_directions():
    """Iterates moving along 2 planted directions plus small noise: SG keeps the planted plane and removes
    (most of) the noise directions inside the trajectory's span."""
    torch.manual_seed(0)
    d, tau = 64, 32
    planted, _ = torch.linalg.qr(torch.randn(d, 2))
    steps = torch.arange(tau, dtype=torch.float32)[:, None]
    coords = torch.cat([steps * 1.0, torch.sin(steps / 3) * 5], dim=1)
    buffer = coords @ planted.T + 1e-3 * torch.randn(tau, d)
    p, istar = subspace_projector(buffer, nu=1e-2)
    assert istar <= 4  # the planted plane explains > 99% of the variance
    assert p.shape[0] == tau - istar
    # a gradient inside the planted plane passes almost untouched... (standardization reweights features,
    # so the kept subspace is not exactly the plane; most of the planted gradient survives)
    g_planted = planted @ torch.tensor([1.0, 1.0])
    kept = project_out(g_planted, p).norm() / g_planted.norm()
    assert kept > 0.9, kept
    # ...while a gradient along the removed rows is removed completely.
    g_noise = p[:5].sum(0)
    assert project_out(g_noise, p).norm() < 1e-4


def test_sg_refreshes_every_tau_steps_and_records_istar():
    sg = SubspaceGradient(tau=4, nu=1e-3, dim=10)
    refreshed = [step for step in range(1, 13) if sg.observe(torch.randn(10) * step, step) is not None]
    assert refreshed == [4, 8, 12]
    assert [s for s, _ in sg.istar_history] == [4, 8, 12]
    assert sg.projector.shape[1] == 10
    state = sg.state_dict()
    other = SubspaceGradient(4, 1e-3, 10)
    other.load_state_dict(state)
    g = torch.randn(10)
    assert torch.equal(other.project(g), sg.project(g))


def test_projector_is_row_major_so_a_reloaded_one_projects_bit_for_bit():
    """LAPACK returns V^T column-major; a projector with those strides made BLAS sum Eq. 8 in another order than
    the same projector reloaded from a checkpoint, so a resumed run drifted (found by the resume test)."""
    g = torch.Generator().manual_seed(0)
    buffer = torch.randn(4, 768, generator=g)
    projector, _ = subspace_projector(buffer, 0.3)
    assert projector.shape[0] >= 1 and projector.stride() == (projector.shape[1], 1)
    reloaded = projector.clone().contiguous()
    grad = torch.randn(768, generator=g)
    assert torch.equal(project_out(grad, projector), project_out(grad, reloaded))
