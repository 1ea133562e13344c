import pytest
import torch

from zoodip.method.timesteps import TimestepSampler, puts, snr_weights, uniform


def test_puts_draws_only_inside_tl_tu():
    g = torch.Generator().manual_seed(0)
    draws = [puts(g, 500, 900) for _ in range(20000)]
    assert min(draws) == 500 and max(draws) == 899  # [T_L, T_U): both ends reached, T_U excluded
    counts = torch.bincount(torch.tensor(draws) - 500, minlength=400)
    assert counts.min() > 20  # uniform: every timestep of the range appears


def test_uniform_covers_all_timesteps():
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([uniform(g, 1000) for _ in range(20000)])
    assert draws.min() == 0 and draws.max() == 999


def test_snr_weights_rise_towards_noise():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    abar = torch.cumprod(1 - betas, 0)
    w = snr_weights(abar)
    assert torch.isclose(w.sum(), torch.tensor(1.0, dtype=w.dtype))
    assert (w[1:] >= w[:-1]).all() and w[-1] > 10 * w[0]
    g = torch.Generator().manual_seed(0)
    sampler = TimestepSampler("snr", 0, 1000, abar)
    draws = torch.tensor([sampler(g) for _ in range(4000)], dtype=torch.float32)
    assert draws.mean() > 550  # skewed to high-noise timesteps


def test_snr_weights_are_textboosts_log_snr_gap():
    """p(t) = (logSNR_max - logSNR(t)) / sum, by hand at three timesteps; mean t about 584 on SD's schedule."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    log_snr = [float(torch.log(a / (1 - a))) for a in abar]
    total = sum(max(log_snr) - v for v in log_snr)
    w = snr_weights(abar)
    for t in (0, 500, 999):
        assert float(w[t]) == pytest.approx((max(log_snr) - log_snr[t]) / total, rel=1e-9)
    assert float((w * torch.arange(1000)).sum()) == pytest.approx(584.3, abs=0.5)
