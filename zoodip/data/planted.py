"""The planted diagnostic: recover a hidden token whose answer is known (`data=planted`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zoodip.data.dataset import OBJECT_TEMPLATES
from zoodip.method.objective import Objective


class PlantedTask:
    """theta* = theta_0 + delta with delta inside a random k-dimensional subspace; the regression target is the
    model's own prediction conditioned on theta*, so L(theta*) = 0 and the optimum is known.

    `loss_ratio` = L_eval(theta) / L_eval(theta_0) on a fixed set of (latent, timestep, noise, prompt) points,
    so it is not one noisy sample; `cosine` compares theta - theta_0 with theta* - theta_0.
    """

    def __init__(
        self,
        theta0: torch.Tensor,
        latent_shape: tuple[int, ...],
        rank: int,
        scale: float,
        num_images: int,
        eval_points: int,
        seed: int,
        sample_timestep,
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        dim = theta0.numel()
        basis, _ = torch.linalg.qr(torch.randn(dim, min(rank, dim), generator=g))
        delta = basis @ torch.randn(basis.shape[1], generator=g)
        self.theta0 = theta0.clone()
        self.delta = delta * (scale * theta0.norm() / delta.norm())
        self.theta_star = theta0 + self.delta
        self.latents = torch.randn(num_images, *latent_shape, generator=g)
        self.eval_set = []
        for _ in range(eval_points):
            z0, prompt = self.sample(g)
            t = sample_timestep(g)
            self.eval_set.append((z0, torch.randn(z0.shape, generator=g), t, prompt))

    def sample(self, generator: torch.Generator) -> tuple[torch.Tensor, str]:
        i = int(torch.randint(len(self.latents), (1,), generator=generator))
        prompt = OBJECT_TEMPLATES[int(torch.randint(len(OBJECT_TEMPLATES), (1,), generator=generator))]
        return self.latents[i : i + 1], prompt

    def set_target(self, objective: Objective) -> None:
        """After `objective.set_sample`: regress onto eps_phi(z_t, t, c(theta*)) instead of the noise. The task's
        own forward pass, not the method's: it is left out of `forward_passes`."""
        passes = objective.forward_passes
        objective.target = objective.predict(self.theta_star[None]).float()
        objective.forward_passes = passes

    def eval_loss(self, objective: Objective, theta: torch.Tensor) -> float:
        """The loss at the fixed evaluation points (not counted in `forward_passes`)."""
        passes, total = objective.forward_passes, 0.0
        for z0, noise, t, prompt in self.eval_set:
            objective.set_sample(z0, noise, t, prompt)
            self.set_target(objective)
            total += float(objective.losses(theta[None])[0])
        objective.forward_passes = passes
        return total / len(self.eval_set)

    def cosine(self, theta: torch.Tensor) -> float:
        return float(F.cosine_similarity((theta - self.theta0)[None], self.delta[None]).clamp(-1, 1))
