"""Noise schedules and training targets.

DiffusionObjective is the DDPM rule of SD1/SD2/SDXL: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, and
the denoiser predicts eps ("epsilon") or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 ("v_prediction").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class DiffusionObjective:
    alphas_cumprod: torch.Tensor  # (T,) float64 on the CPU
    prediction_type: str = "epsilon"  # or "v_prediction"
    min_timestep: int = 0
    max_timestep: int | None = None  # exclusive; None: T

    @classmethod
    def from_scheduler(cls, scheduler, v_parameterization: bool = False) -> "DiffusionObjective":
        prediction = scheduler.config.prediction_type
        if v_parameterization:
            prediction = "v_prediction"
        if prediction not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction type {prediction!r} is not trained here")
        return cls(scheduler.alphas_cumprod.to(torch.float64), prediction)

    @property
    def num_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def sample_timesteps(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        high = self.max_timestep or self.num_timesteps
        return torch.randint(self.min_timestep, high, (batch,), generator=generator)

    def _coefficients(self, timesteps: torch.Tensor, like: torch.Tensor):
        abar = self.alphas_cumprod[timesteps.cpu()]
        shape = (-1,) + (1,) * (like.dim() - 1)
        signal = abar.sqrt().to(like.device, like.dtype).view(shape)
        sigma = (1 - abar).sqrt().to(like.device, like.dtype).view(shape)
        return signal, sigma

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        signal, sigma = self._coefficients(timesteps, latents)
        return signal * latents + sigma * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        signal, sigma = self._coefficients(timesteps, latents)
        return signal * noise - sigma * latents


def denoising_loss(family, parts, objective: DiffusionObjective, latents: torch.Tensor,
                   conditioning: dict[str, torch.Tensor], noise: torch.Tensor, timesteps: torch.Tensor,
                   mask: torch.Tensor | None = None, sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error of the denoiser's prediction against the objective's target.

    mask: (B, 1, h, w) in latent space, weights each latent pixel (alpha_mask); the per-sample loss is
    the masked mean. sample_weights: (B,), e.g. prior_loss_weight for regularization images."""
    noisy = objective.add_noise(latents, noise, timesteps)
    prediction = family.predict(parts, noisy, timesteps.to(latents.device), conditioning)
    target = objective.target(latents, noise, timesteps)
    per_element = F.mse_loss(prediction.float(), target.float(), reduction="none")
    return reduce_loss(per_element, mask, sample_weights)


def reduce_loss(per_element: torch.Tensor, mask: torch.Tensor | None = None,
                sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C, h, w) element losses -> one number: masked mean per sample, weighted mean over the batch."""
    if mask is not None:
        mask = mask.to(per_element.device, per_element.dtype).expand_as(per_element)
        per_sample = (per_element * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1e-8)
    else:
        per_sample = per_element.flatten(1).mean(1)
    if sample_weights is not None:
        per_sample = per_sample * sample_weights.to(per_sample.device, per_sample.dtype)
    return per_sample.mean()
