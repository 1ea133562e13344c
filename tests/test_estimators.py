"""Each estimator against a hand computation (Eq. 3 / S10, S11, S12)."""

import pytest
import torch

from zoodip.method.estimators import backprop, combine, direction, direction_seeds, one_point, rge, spsa

SEEDS = [11, 22, 33]


def linear_loss(w: torch.Tensor):
    return lambda thetas: thetas @ w


def test_direction_is_a_pure_function_of_its_seed():
    assert torch.equal(direction(5, 16), direction(5, 16))
    assert not torch.equal(direction(5, 16), direction(6, 16))
    assert len(set(direction_seeds(0, 7, 3))) == 3
    assert direction_seeds(0, 7, 3) != direction_seeds(0, 8, 3)


def test_rge_hand_computation():
    theta = torch.tensor([0.5, -1.0, 2.0])
    f = lambda x: (x**2).sum(-1)  # noqa: E731
    mu, n = 0.1, 2
    e1, e2 = direction(SEEDS[0], 3), direction(SEEDS[1], 3)
    by_hand = ((f(theta + mu * e1) - f(theta)) / mu * e1 + (f(theta + mu * e2) - f(theta)) / mu * e2) / 2
    est = rge(f, theta, n, mu, SEEDS)
    torch.testing.assert_close(est.grad, by_hand)
    assert est.forward_passes == 3 and est.loss == float(f(theta))


def test_spsa_hand_computation():
    theta = torch.tensor([0.5, -1.0, 2.0])
    f = lambda x, groups=None: (x**3).sum(-1)  # noqa: E731
    mu = 0.05
    e1, e2 = direction(SEEDS[0], 3), direction(SEEDS[1], 3)
    by_hand = (
        (f(theta + mu * e1) - f(theta - mu * e1)) / (2 * mu) * e1
        + (f(theta + mu * e2) - f(theta - mu * e2)) / (2 * mu) * e2
    ) / 2
    est = spsa(f, theta, 2, mu, SEEDS)
    torch.testing.assert_close(est.grad, by_hand)
    assert est.forward_passes == 4


def test_one_point_hand_computation():
    theta = torch.tensor([0.5, -1.0, 2.0])
    f = lambda x: (x**2).sum(-1)  # noqa: E731
    mu = 0.1
    e = [direction(s, 3) for s in SEEDS]
    # the residual times the newer direction e_{i+1} (Zhang et al. 2022; Eq. S12 as printed has e_i, which points
    # uphill on average: tests/test_estimator_properties.py)
    by_hand = (
        (f(theta + mu * e[1]) - f(theta + mu * e[0])) / mu * e[1]
        + (f(theta + mu * e[2]) - f(theta + mu * e[1])) / mu * e[2]
    ) / 2
    est = one_point(f, theta, 2, mu, SEEDS)
    torch.testing.assert_close(est.grad, by_hand)
    assert est.forward_passes == 3


def test_combine_regenerates_directions():
    c = torch.tensor([2.0, -1.0])
    torch.testing.assert_close(combine(c, SEEDS[:2], 5), (2 * direction(SEEDS[0], 5) - direction(SEEDS[1], 5)) / 2)


def test_rge_mean_approaches_true_gradient_of_a_quadratic():
    torch.manual_seed(0)
    d = 8
    a = torch.randn(d, d)
    hess = a @ a.T / d + torch.eye(d)
    theta = torch.randn(d)
    f = lambda x: 0.5 * ((x @ hess) * x).sum(-1)  # noqa: E731
    true = hess @ theta
    grads = [rge(f, theta, 1, 1e-4, direction_seeds(0, step, 2)).grad for step in range(20000)]
    mean = torch.stack(grads).mean(0)
    rel = (mean - true).norm() / true.norm()
    assert rel < 0.05, rel
    # a single estimate is far from it: the average is doing the work
    assert (grads[0] - true).norm() / true.norm() > 0.2


def test_backprop_is_the_exact_gradient():
    w = torch.tensor([1.0, -2.0, 3.0])
    est = backprop(lambda x: (x * w).sum(-1) ** 2, torch.tensor([1.0, 1.0, 1.0]))
    torch.testing.assert_close(est.grad, 2 * 2.0 * w)


def test_antithetic_is_the_central_difference_exact_on_a_quadratic():
    """f = 1/2 theta^T A theta + b^T theta: (f(theta + mu e) - f(theta - mu e)) / (2 mu) = grad . e exactly, so
    g = (2/n) sum_i (grad . e_i) e_i by hand, with n + 1 passes (L(theta) shared) and an even n required."""
    from zoodip.method.estimators import antithetic

    g = torch.Generator().manual_seed(0)
    dim = 6
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    a = a @ a.T
    b = torch.randn(dim, generator=g, dtype=torch.float64)
    theta = torch.randn(dim, generator=g)

    def loss_fn(thetas, groups=None):
        t = thetas.double()
        return 0.5 * ((t @ a) * t).sum(dim=1) + t @ b

    seeds = direction_seeds(3, 7, 5)
    est = antithetic(loss_fn, theta, 4, 1e-2, seeds)
    grad = a @ theta.double() + b
    hand = sum(float(grad @ direction(s, dim).double()) * direction(s, dim).double() for s in seeds[:2]) / 2
    torch.testing.assert_close(est.grad.double(), hand, atol=1e-4, rtol=1e-4)
    assert est.forward_passes == 5 and len(est.losses) == 5 and est.loss == pytest.approx(float(loss_fn(theta[None])))
    with pytest.raises(ValueError, match="even n"):
        antithetic(loss_fn, theta, 3, 1e-2, seeds)


def test_guided_covariance_inverse_and_both_means():
    """Sigma = alpha I + (1 - alpha) (D/k) U U^T: the closed-form Sigma^-1 inverts the explicit matrix, directions
    have that covariance; on a linear loss the mean estimate over many seeds is Sigma w as published, w itself with
    `unbiased`; one estimate by hand; n + 1 passes."""
    from zoodip.method.estimators import guided, guided_directions, guided_inverse

    g = torch.Generator().manual_seed(1)
    dim, k, alpha = 8, 2, 0.3
    basis, _ = torch.linalg.qr(torch.randn(dim, k, generator=g))
    sigma = alpha * torch.eye(dim) + (1 - alpha) * dim / k * basis @ basis.T
    v = torch.randn(dim, generator=g)
    torch.testing.assert_close(sigma @ guided_inverse(v, basis, alpha), v, atol=1e-5, rtol=1e-5)
    dirs = guided_directions(list(range(20000)), basis, alpha)
    torch.testing.assert_close(dirs.T @ dirs / len(dirs), sigma, atol=0.15, rtol=0)
    w = torch.randn(dim, generator=g)

    def linear(thetas):
        return thetas @ w

    def mean(unbiased: bool) -> torch.Tensor:
        seeds = [[2 * i, 2 * i + 1, 0] for i in range(4000)]
        return torch.stack([guided(linear, torch.zeros(dim), 2, 1e-3, s, basis, alpha, unbiased).grad for s in seeds])

    published, unbiased = mean(False), mean(True)
    for estimates, expected in ((published, sigma @ w), (unbiased, w)):
        assert (estimates.mean(0) - expected).norm() < 0.1 * expected.norm()
    e = guided_directions([0, 1], basis, alpha)
    torch.testing.assert_close(published[0], (w @ e[0]) * e[0] / 2 + (w @ e[1]) * e[1] / 2, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(unbiased[0], guided_inverse(published[0], basis, alpha), atol=1e-4, rtol=1e-4)
    assert guided(linear, torch.zeros(dim), 2, 1e-3, [0, 1, 2], basis, alpha).forward_passes == 3


def quadratic(hess_diag: torch.Tensor, b: torch.Tensor):
    """f = 1/2 sum_j h_j theta_j^2 + b . theta (float64): its gradient h * theta + b and diag(H) = h are known."""

    def f(thetas: torch.Tensor, groups=None) -> torch.Tensor:
        t = thetas.double()
        return 0.5 * (t**2 * hess_diag).sum(-1) + t @ b

    return f


def test_hizoo_hand_computation_and_state_update():
    """One step by hand: Sigma = clip(mean(h) / h), g = (L+ - L-) / (2 mu) Sigma^1/2 u, h <- (1 - a) h + a |h_hat|
    with h_hat = (L+ + L- - 2 L0) / (2 mu^2) (u^2 - 1) / Sigma; 2n + 1 passes."""
    from zoodip.method.estimators import hizoo

    h_true, b = torch.tensor([1.0, 4.0, 0.25], dtype=torch.float64), torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    f = quadratic(h_true, b)
    theta, mu, a = torch.tensor([0.5, -1.0, 2.0]), 0.1, 0.5
    h = torch.tensor([1.0, 2.0, 100.0])
    sigma = (h.mean() / h).clamp(1 / 10, 10)  # the third entry is clipped: 34.33 / 100 -> 0.3433; 34.33 / 1 -> 10
    assert float(sigma[0]) == 10.0
    u = direction(SEEDS[0], 3)
    step = mu * sigma.sqrt() * u
    lp, lm, l0 = (float(f((theta + step)[None])), float(f((theta - step)[None])), float(f(theta[None])))
    grad = (lp - lm) / (2 * mu) * sigma.sqrt() * u
    h_hat = (lp + lm - 2 * l0) / (2 * mu**2) * (u**2 - 1) / sigma
    expected_h = 0.5 * h + 0.5 * h_hat.abs()
    est = hizoo(f, theta, 1, mu, SEEDS, h, a, 10.0)
    torch.testing.assert_close(est.grad, grad.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(h, expected_h.float(), rtol=1e-4, atol=1e-5)
    assert est.forward_passes == 3 and est.loss == pytest.approx(l0)


def test_hizoo_curvature_estimate_is_unbiased_and_gradient_is_preconditioned():
    """On a quadratic, the mean of h_hat over many directions is diag(H), and the mean of g is Sigma grad."""
    from zoodip.method.estimators import hizoo

    h_true = torch.tensor([0.5, 2.0, 8.0, 1.0], dtype=torch.float64)
    b = torch.tensor([1.0, -1.0, 0.5, 0.0], dtype=torch.float64)
    f, theta = quadratic(h_true, b), torch.tensor([0.2, 0.1, -0.3, 0.4])
    h0 = torch.tensor([1.0, 1.0, 2.0, 4.0])
    sigma = (h0.mean() / h0).clamp(0.1, 10).double()
    hats, grads = [], []
    for i in range(6000):
        h = h0.clone()  # smoothing 1: h becomes |h_hat| itself, which is h_hat's size up to sign
        est = hizoo(f, theta, 1, 1e-2, [i, 0], h, 1.0, 10.0)
        u = direction(i, 4).double()
        hats.append(h.double() * torch.sign(u**2 - 1))  # on a convex quadratic h_hat's sign is (u^2 - 1)'s
        grads.append(est.grad.double())
    grad_true = h_true * theta.double() + b
    torch.testing.assert_close(torch.stack(grads).mean(0), sigma * grad_true, atol=0.08, rtol=0)
    mean_hat = torch.stack(hats).mean(0)
    torch.testing.assert_close(mean_hat, h_true, atol=0.6, rtol=0.15)


def test_prgf_keeps_the_prior_and_is_the_projection_on_a_linear_loss():
    """On a linear loss, g = sum_i (w . u_i) u_i exactly: the projection of w onto span(v, u_2..u_n); with the prior
    along w the estimate is w itself; n + 1 passes."""
    from zoodip.method.estimators import prgf

    w = torch.tensor([1.0, -2.0, 0.5, 3.0])
    f = lambda x, groups=None: x @ w  # noqa: E731
    est = prgf(f, torch.zeros(4), 2, 1e-3, SEEDS, prior=w * 7)
    torch.testing.assert_close(est.grad, w, atol=1e-3, rtol=1e-3)
    assert est.forward_passes == 3
    v = torch.tensor([1.0, 0.0, 0.0, 0.0])
    est = prgf(f, torch.zeros(4), 2, 1e-3, SEEDS, prior=v)
    u2 = direction(SEEDS[0], 4)
    u2 = u2 - (u2 @ v) * v
    u2 = u2 / u2.norm()
    torch.testing.assert_close(est.grad, (w @ v) * v + (w @ u2) * u2, atol=1e-3, rtol=1e-3)
    no_prior = prgf(f, torch.zeros(4), 2, 1e-3, SEEDS, prior=torch.zeros(0))
    assert no_prior.forward_passes == 3 and float(no_prior.grad.norm()) <= float(w.norm()) + 1e-3


def test_spsa_and_antithetic_mark_their_pairs():
    """puts.stratified relies on these groups: each +/- pair shares one group; antithetic's L(theta) is group 0."""
    from zoodip.method.estimators import antithetic

    seen = {}

    def f(thetas, groups=None):
        seen["groups"] = groups
        return thetas.sum(-1)

    spsa(f, torch.zeros(3), 3, 0.1, direction_seeds(0, 0, 4))
    assert seen["groups"] == [0, 1, 2, 0, 1, 2]
    antithetic(f, torch.zeros(3), 4, 0.1, direction_seeds(0, 0, 5))
    assert seen["groups"] == [0, 0, 1, 0, 1]
