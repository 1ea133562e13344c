"""Diffusion timestep samplers: PUTS (paper Sec. 3.4, Eq. 9), uniform, and SNR-based (TextBoost)."""

from __future__ import annotations

import torch

SAMPLERS = ("puts", "uniform", "snr")


def puts(generator: torch.Generator, t_low: int, t_high: int) -> int:
    """Partial Uniform Timestep Sampling, Eq. 9: t ~ U(T_L, T_U), an integer in [T_L, T_U)."""
    return int(torch.randint(t_low, t_high, (1,), generator=generator))


def uniform(generator: torch.Generator, num_train_timesteps: int) -> int:
    """The usual DDPM training draw, t ~ U(0, T)."""
    return puts(generator, 0, num_train_timesteps)


def snr_weights(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """SNR-based sampling weights (Table 5's baseline), p(t) proportional to logSNR_max - logSNR(t), with
    logSNR(t) = log(alpha_bar_t / (1 - alpha_bar_t)).

    TextBoost (Park et al. 2024) samples by SNR so that high-noise timesteps, where text matters most, are drawn
    more often. The ZOODiP paper does not restate the weighting; this is the one in TextBoost's own code (mean t
    about 584 on Stable Diffusion's schedule). zoodip first used 1 - alpha_bar_t, which gives mean t about 648.
    """
    log_snr = torch.log(alphas_cumprod.double()) - torch.log1p(-alphas_cumprod.double())
    weights = log_snr.max() - log_snr
    return weights / weights.sum()


def snr(generator: torch.Generator, alphas_cumprod: torch.Tensor) -> int:
    return int(torch.multinomial(snr_weights(alphas_cumprod), 1, generator=generator))


class TimestepSampler:
    """One timestep per training step, from the `puts` config group (kind = puts | uniform | snr)."""

    def __init__(self, kind: str, t_low: int, t_high: int, alphas_cumprod: torch.Tensor) -> None:
        self.kind, self.t_low, self.t_high = kind, t_low, t_high
        self.alphas_cumprod = alphas_cumprod

    def strata(self, generator: torch.Generator, count: int) -> list[int]:
        """`count` timesteps, one uniform in each of `count` equal strata of [T_L, T_U) (uniform: [0, T)). Each
        marginal is its stratum's and their mixture is Eq. 9's U(T_L, T_U), so an average over them estimates the
        same expected loss with less variance (puts.stratified)."""
        low, high = (self.t_low, self.t_high) if self.kind == "puts" else (0, len(self.alphas_cumprod))
        offsets = torch.rand(count, generator=generator, dtype=torch.float64).tolist()
        return [low + min(int((i + u) * (high - low) / count), high - low - 1) for i, u in enumerate(offsets)]

    def __call__(self, generator: torch.Generator) -> int:
        if self.kind == "puts":
            return puts(generator, self.t_low, self.t_high)
        if self.kind == "uniform":
            return uniform(generator, len(self.alphas_cumprod))
        return snr(generator, self.alphas_cumprod)
