"""Every registered zeroth-order estimator, tested by what it is for: the mean of many estimates points where theory
says it points. No formula is retyped here; a wrong sign, a wrong direction or a wrong index fails.

On random quadratics L(x) = 1/2 (x - a)^T H (x - a), the mean of 2,000 estimates at one point (directions seeded per
draw, the estimator's state held fixed) must have cosine >= 0.9 with E[g], the expectation theory gives:

* unbiased estimators (the default, so an estimator added to the registry is held to it until its author states a
  bias below): E[g] = grad. For RGE's forward difference this holds on a quadratic exactly, since
  E[(mu/2 e^T H e) e] = 0 for a symmetric e;
* `EXPECTED` names the biased ones and what they estimate instead.

Every mean must also be a descent direction (positive cosine with grad). The state the stateful estimators hold
(guided's subspace, prgf's prior, hizoo's diag(H)) comes from real training steps on *another* quadratic, so it is
generic, not aligned with the gradient under test: a test against grad could not pass a biased estimator by luck.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_train
from hypothesis import given, settings
from hypothesis import strategies as st

from zoodip import CONF_DIR
from zoodip.method.estimators import backprop, direction_seeds, rge
from zoodip.method.methods import METHODS, GradientMethod
from zoodip.schema import method_settings

#: Every zeroth-order estimator of the registry: an `estimator` config with a non-autograd registry entry.
ESTIMATORS = sorted(
    p.stem for p in (CONF_DIR / "estimator").glob("*.yaml") if p.stem in METHODS and not METHODS[p.stem].autograd
)
#: Options that change what an estimator estimates, tested as estimators of their own.
VARIANTS = {"guided-unbiased": ("guided", ["estimator.unbiased=true"])}
#: Settings under which the warm-up leaves a state far from the identity, so that a biased estimator's E[g] is far
#: from grad (guided: a 2-dimensional U; hizoo: diag(H) learned fast).
SETTINGS = {"guided": ["estimator.k=2"], "hizoo": ["estimator.smoothing=0.5"]}
DRAWS = 2000


def guided_published(method: GradientMethod, grad: torch.Tensor) -> torch.Tensor:
    """Guided ES as published: e ~ N(0, Sigma) and no correction, so E[g] = Sigma grad,
    Sigma = alpha I + (1 - alpha) (D / k) U U^T (zoodip's scale of the paper's Sigma)."""
    u = method.estimator.basis().to(grad.dtype)
    dim, k = u.shape
    alpha = method.estimator.settings.alpha
    return alpha * grad + ((1 - alpha) * dim / k * u @ (u.T @ grad) if k else 0)


def hizoo_preconditioned(method: GradientMethod, grad: torch.Tensor) -> torch.Tensor:
    """Perturbations along Sigma^1/2 u, u ~ N(0, I): E[g] = Sigma grad, Sigma = diag(mean(h) / h) clipped."""
    h, clip = method.estimator.hessian.to(grad.dtype), method.estimator.settings.clip
    return (h.mean() / h).clamp(1 / clip, clip) * grad


def prgf_projection(method: GradientMethod, grad: torch.Tensor) -> torch.Tensor:
    """g = sum_i (grad . u_i) u_i with u_1 the prior v and u_2..u_n a uniformly random orthonormal frame of v's
    (D - 1)-dimensional complement: E[g] = (grad . v) v + (n - 1) / (D - 1) (grad - (grad . v) v)."""
    prior = method.estimator.prior
    v = prior.to(grad.dtype) / prior.norm()
    along = (grad @ v) * v
    return along + (method.n - 1) / (grad.numel() - 1) * (grad - along)


#: What the biased estimators estimate, from theory. Everything else must estimate grad itself.
EXPECTED: dict[str, Callable[[GradientMethod, torch.Tensor], torch.Tensor]] = {
    "guided": guided_published,
    "hizoo": hizoo_preconditioned,
    "prgf": prgf_projection,
}


def quadratic(dim: int, generator: torch.Generator) -> tuple[Callable, Callable]:
    """L(x) = 1/2 (x - a)^T H (x - a) with H = Q diag(lambda) Q^T, lambda log-uniform in [0.2, 5]: (loss_fn, grad)."""
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    lam = torch.exp(torch.empty(dim, dtype=torch.float64).uniform_(-1.6, 1.6, generator=generator))
    hess = q @ torch.diag(lam) @ q.T
    a = torch.randn(dim, generator=generator, dtype=torch.float64)

    def loss_fn(thetas: torch.Tensor, groups=None) -> torch.Tensor:
        d = thetas.double() - a
        return 0.5 * ((d @ hess) * d).sum(-1)

    return loss_fn, lambda x: hess @ (x.double() - a)


def mean_estimate(name: str, seed: int, dim: int, draws: int = DRAWS):
    """The mean of `draws` estimates of estimator `name` (a registry name or a VARIANTS key) at one point of a random
    quadratic, with the state the estimator reached after 12 training steps on another one; (mean, grad, E[g])."""
    estimator, options = VARIANTS.get(name, (name, []))
    cfg = compose_train(
        f"estimator={estimator}",
        "sg=off",
        "estimator.mu=1e-3",
        f"train.seed={seed}",
        *SETTINGS.get(estimator, []),
        *options,
    )
    g = torch.Generator().manual_seed(seed)
    warm_up, _ = quadratic(dim, g)
    loss_fn, gradient = quadratic(dim, g)
    theta = torch.nn.Parameter(torch.randn(dim, generator=g))
    method = METHODS[estimator].build(method_settings(cfg), theta, [], 1)
    for step in range(1, 13):
        method.step(warm_up, step)
    state = method.estimator.state()
    estimates = []
    for draw in range(draws):
        method.estimator.load_state(state)  # the same state for every draw (hizoo updates its own in place)
        estimates.append(method.estimate(loss_fn, 1_000 + draw).grad.double())
    method.estimator.load_state(state)
    grad = gradient(theta.detach())
    expected = grad if name in VARIANTS else EXPECTED.get(name, lambda m, g: g)(method, grad)
    return torch.stack(estimates).mean(0), grad, expected


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double(), b.double(), dim=0))


def test_every_zeroth_order_estimator_is_covered():
    assert {"rge", "spsa", "one_point", "antithetic", "guided", "hizoo", "prgf"} <= set(ESTIMATORS)
    assert "backprop" not in ESTIMATORS and set(EXPECTED) <= set(ESTIMATORS)


@pytest.mark.parametrize("name", ESTIMATORS + list(VARIANTS))
@settings(max_examples=3, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**20), dim=st.integers(8, 24))
def test_the_mean_estimate_points_where_theory_says(name, seed, dim):
    mean, grad, expected = mean_estimate(name, seed, dim)
    assert cosine(mean, expected) >= 0.9, (cosine(mean, expected), cosine(mean, grad))
    assert cosine(mean, grad) > 0, "the mean estimate is not a descent direction"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_biased_estimators_are_told_apart_from_the_gradient(name):
    """The states reached make E[g] visibly not grad (cosine < 0.97), so the test above checks the bias itself."""
    _, grad, expected = mean_estimate(name, 3, 16, draws=1)
    assert cosine(expected, grad) < 0.97


# ------------------------------------------------------------------------------- on a real model's loss
@pytest.fixture(scope="module")
def tiny_loss():
    """The tiny model's L(theta) (fp32, unquantized) at one fixed sample (latent, noise, t = 700, prompt), the
    initializer's token theta_0, and the exact gradient there by backprop (as train.grad_cosine_every computes it)."""
    from zoodip.method.objective import Objective, TextConditioner
    from zoodip.models.loading import load_components

    parts = load_components("tiny", "random", None, torch.float32, torch.device("cpu"), "none", seed=0)
    text = TextConditioner(parts, "<p>", "dog", 1)
    objective = Objective(parts, text, batched=True, max_batch=64)
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(1, parts.unet.config.in_channels, 8, 8, generator=g)
    objective.set_sample(z0, torch.randn(z0.shape, generator=g), 700, "a photo of {}")
    theta = text.initial_theta()
    return objective, theta, backprop(objective.losses, theta).grad


def real_model_cosine(tiny_loss, width: int, draws: int, n: int) -> float:
    """cos(mean of `draws` RGE estimates (n directions each, mu 1e-3), exact gradient) of theta -> L(theta_0 + B z)
    over z in R^width, B orthonormal (B = I: the whole token). Same loss, fewer dimensions: fewer passes needed."""
    objective, theta, exact = tiny_loss
    dim = theta.numel()
    basis = torch.linalg.qr(torch.randn(dim, width, generator=torch.Generator().manual_seed(1)))[0]
    if width == dim:
        basis = torch.eye(dim)

    def loss_fn(zs: torch.Tensor, groups=None) -> torch.Tensor:
        with torch.inference_mode():
            return objective.losses(theta + zs @ basis.T)

    z = torch.zeros(width)
    mean = torch.stack([rge(loss_fn, z, n, 1e-3, direction_seeds(0, d, n + 1)).grad for d in range(draws)]).mean(0)
    return cosine(mean, basis.T @ exact)


def test_rge_mean_points_along_the_backprop_gradient_of_the_tiny_model(tiny_loss):
    """320 directions in a 16-dimensional slice of the token: cosine about 0.97 by the count alone."""
    assert real_model_cosine(tiny_loss, 16, 10, 32) >= 0.9


@pytest.mark.slow
def test_rge_mean_points_along_the_backprop_gradient_over_the_whole_token(tiny_loss):
    """All 768 dimensions: 6,144 directions (about 3 minutes on one CPU thread), cosine about 0.94 by the count."""
    assert real_model_cosine(tiny_loss, 768, 48, 128) >= 0.9
