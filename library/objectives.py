"""Noise schedules, training targets and the loss options.

DiffusionObjective is the DDPM rule of SD1/SD2/SDXL: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, and
the denoiser predicts eps ("epsilon") or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 ("v_prediction").

The loss options users know from sd-scripts are pure functions below (noise offset, multires noise,
input perturbation, min-SNR / debiased / v-like weighting, l1 / huber / smooth_l1 with a timestep
schedule for the huber threshold, zero terminal SNR); each is tested against its closed form.
"""
from __future__ import annotations

import math
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

    def with_zero_terminal_snr(self) -> "DiffusionObjective":
        """The same schedule rescaled so that the last timestep has zero SNR (Lin et al. 2023)."""
        return DiffusionObjective(zero_terminal_snr(self.alphas_cumprod), self.prediction_type,
                                  self.min_timestep, self.max_timestep)

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio abar / (1 - abar) of each timestep, float64 on the CPU."""
        abar = self.alphas_cumprod[timesteps.cpu()]
        return abar / (1 - abar).clamp_min(1e-12)

    @property
    def num_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def sample_timesteps(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Uniform in [min_timestep, max_timestep); equal bounds give that one timestep."""
        high = self.max_timestep if self.max_timestep is not None else self.num_timesteps
        if high <= self.min_timestep:
            return torch.full((batch,), self.min_timestep, dtype=torch.long)
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


@dataclass(frozen=True)
class LossOptions:
    """The [loss] section, as the step needs it (defaults: plain MSE on plain Gaussian noise)."""
    loss_type: str = "l2"  # l2, l1, huber, smooth_l1
    huber_c: float = 0.1
    huber_schedule: str = "snr"  # constant, exponential, snr
    huber_scale: float = 1.0
    min_snr_gamma: float | None = None
    debiased_estimation_loss: bool = False
    scale_v_pred_loss_like_noise_pred: bool = False
    noise_offset: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float | None = None


def configure(objective: DiffusionObjective, loss_section) -> tuple[DiffusionObjective, LossOptions]:
    """Apply the [loss] section: timestep range and zero terminal SNR to the objective, the rest as options."""
    if loss_section.zero_terminal_snr:
        objective = objective.with_zero_terminal_snr()
    objective.min_timestep, objective.max_timestep = loss_section.min_timestep, loss_section.max_timestep
    fields = LossOptions.__dataclass_fields__
    return objective, LossOptions(**{k: getattr(loss_section, k) for k in fields})


def draw_noise(shape: tuple, generator: torch.Generator, options: LossOptions = LossOptions()):
    """(target noise, input noise): Gaussian noise with the offset / multires options applied, and the
    noise the latents are actually noised with (input perturbation adds ip_noise_gamma * N(0, 1))."""
    noise = torch.randn(shape, generator=generator)
    if options.noise_offset:
        noise = apply_noise_offset(noise, options.noise_offset, generator)
    if options.multires_noise_iterations:
        noise = apply_multires_noise(noise, options.multires_noise_iterations, options.multires_noise_discount,
                                     generator)
    if options.ip_noise_gamma:
        return noise, noise + options.ip_noise_gamma * torch.randn(shape, generator=generator)
    return noise, noise


def apply_noise_offset(noise: torch.Tensor, offset: float, generator: torch.Generator) -> torch.Tensor:
    """noise + offset * N(0, 1) drawn once per sample and channel (shifts the mean brightness)."""
    return noise + offset * torch.randn((*noise.shape[:2], 1, 1), generator=generator)


def apply_multires_noise(noise: torch.Tensor, iterations: int, discount: float,
                         generator: torch.Generator) -> torch.Tensor:
    """Pyramid noise: add coarser noise upsampled (bilinear), level i weighted discount**i and scaled
    down by a random factor r in [2, 4) per level; the result is renormalised to unit std."""
    b, c, h, w = noise.shape
    for i in range(1, iterations + 1):
        r = 2 + 2 * torch.rand((), generator=generator).item()
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        coarse = torch.randn((b, c, hn, wn), generator=generator)
        noise = noise + F.interpolate(coarse, size=(h, w), mode="bilinear") * discount**i
        if hn == 1 or wn == 1:
            break
    return noise / noise.std()


def element_loss(prediction: torch.Tensor, target: torch.Tensor, loss_type: str,
                 huber_c: torch.Tensor | None = None) -> torch.Tensor:
    """Per-element loss. huber: 2c(sqrt(d^2 + c^2) - c); smooth_l1: 2(sqrt(d^2 + c^2) - c); c per sample."""
    diff = prediction.float() - target.float()
    if loss_type == "l2":
        return diff**2
    if loss_type == "l1":
        return diff.abs()
    c = huber_c.to(diff.device, diff.dtype).view(-1, *([1] * (diff.dim() - 1)))
    if loss_type == "huber":
        return 2 * c * (torch.sqrt(diff**2 + c**2) - c)
    if loss_type == "smooth_l1":
        return 2 * (torch.sqrt(diff**2 + c**2) - c)
    raise ValueError(f"loss_type {loss_type!r}")


def huber_threshold(objective: DiffusionObjective, timesteps: torch.Tensor, options: LossOptions) -> torch.Tensor:
    """The huber c of each sample: constant c; exponential c^(t/T); snr: (1 - c) / (1 + sigma_t)^2 + c
    with sigma_t = sqrt((1 - abar_t) / abar_t) — near 1 (MSE-like) at low noise, c at high noise."""
    t = timesteps.cpu().double()
    if options.huber_schedule == "constant":
        c = torch.full_like(t, options.huber_c)
    elif options.huber_schedule == "exponential":
        c = torch.exp(math.log(options.huber_c) * t / objective.num_timesteps)
    else:
        abar = objective.alphas_cumprod[timesteps.cpu()]
        sigma = ((1 - abar) / abar).sqrt()
        c = (1 - options.huber_c) / (1 + sigma) ** 2 + options.huber_c
    return (c * options.huber_scale).float()


def timestep_weights(objective: DiffusionObjective, timesteps: torch.Tensor, options: LossOptions):
    """Per-sample loss weights from the SNR options, or None. SNR is capped at 1000 as sd-scripts does."""
    v = objective.prediction_type == "v_prediction"
    snr = objective.snr(timesteps).clamp(1e-8, 1000.0)
    weight = torch.ones_like(snr)
    if options.scale_v_pred_loss_like_noise_pred:
        weight = weight * snr / (snr + 1)
    if options.min_snr_gamma:
        weight = weight * torch.minimum(snr, torch.full_like(snr, options.min_snr_gamma)) / (snr + 1 if v else snr)
    if options.debiased_estimation_loss:
        weight = weight / torch.sqrt(snr + 1 if v else snr)
    if torch.equal(weight, torch.ones_like(weight)):
        return None
    return weight.float()


def zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(abar) so the last step is pure noise and the first is unchanged."""
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    return root**2


def denoising_loss(family, parts, objective: DiffusionObjective, latents: torch.Tensor,
                   conditioning: dict[str, torch.Tensor], noise: torch.Tensor, timesteps: torch.Tensor,
                   mask: torch.Tensor | None = None, sample_weights: torch.Tensor | None = None,
                   options: LossOptions = LossOptions(), input_noise: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of the denoiser's prediction against the objective's target, with the loss options.

    mask: (B, 1, h, w) in latent space, weights each latent pixel (alpha_mask); the per-sample loss is
    the masked mean. sample_weights: (B,), e.g. prior_loss_weight for regularization images.
    input_noise: the noise the latents are noised with when it differs from the target's (ip_noise_gamma)."""
    noisy = objective.add_noise(latents, noise if input_noise is None else input_noise, timesteps)
    prediction = family.predict(parts, noisy, timesteps.to(latents.device), conditioning)
    target = objective.target(latents, noise, timesteps)
    huber_c = huber_threshold(objective, timesteps, options) if options.loss_type in ("huber", "smooth_l1") else None
    per_element = element_loss(prediction, target, options.loss_type, huber_c)
    weights = timestep_weights(objective, timesteps, options)
    if weights is not None:
        sample_weights = weights if sample_weights is None else sample_weights.cpu().float() * weights
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
