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

    def sample_timesteps(self, batch: int, generator: torch.Generator, latent_shape=None) -> torch.Tensor:
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

    def model_output(self, prediction: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the loss compares with the target: the denoiser's output as it is."""
        return prediction

    def loss_weights(self, timesteps: torch.Tensor, options: "LossOptions"):
        return timestep_weights(self, timesteps, options)


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
    noise_offset_random_strength: bool = False  # the offset scaled by U(0, 1), drawn once per batch
    adaptive_noise_scale: float | None = None  # offset + scale * |latent channel mean|, per sample and channel
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False  # gamma scaled by U(0, 1), drawn once per batch


def configure(objective: DiffusionObjective, loss_section) -> tuple[DiffusionObjective, LossOptions]:
    """Apply the [loss] section: timestep range and zero terminal SNR to the objective, the rest as options."""
    if isinstance(objective, FlowMatchObjective):
        return configure_flow(objective, loss_section)
    flow_set = [k for k in FLOW_KEYS if getattr(loss_section, k, None) is not None]
    if flow_set:
        from library.config import ConfigError

        raise ConfigError(f"'loss.{flow_set[0]}': a flow-matching option (SD3, FLUX.1); this model trains with "
                          f"the DDPM noise schedule")
    if loss_section.zero_terminal_snr:
        objective = objective.with_zero_terminal_snr()
    objective.min_timestep, objective.max_timestep = loss_section.min_timestep, loss_section.max_timestep
    fields = LossOptions.__dataclass_fields__
    return objective, LossOptions(**{k: getattr(loss_section, k) for k in fields})


def draw_noise(shape: tuple, generator: torch.Generator, options: LossOptions = LossOptions(),
               latent_means: torch.Tensor | None = None):
    """(target noise, input noise): Gaussian noise with the offset / multires options applied, and the
    noise the latents are actually noised with (input perturbation adds ip_noise_gamma * N(0, 1)).
    latent_means: |mean over H, W| of each latent (B, C, 1, 1), for adaptive_noise_scale."""
    noise = torch.randn(shape, generator=generator)
    if options.noise_offset:
        offset = options.noise_offset
        if options.noise_offset_random_strength:
            offset = offset * torch.rand((), generator=generator).item()
        if options.adaptive_noise_scale and latent_means is not None:  # as sd-scripts' apply_noise_offset
            offset = torch.clamp(offset + options.adaptive_noise_scale * latent_means.float().cpu(), min=0.0)
        noise = apply_noise_offset(noise, offset, generator)
    if options.multires_noise_iterations:
        noise = apply_multires_noise(noise, options.multires_noise_iterations, options.multires_noise_discount,
                                     generator)
    if options.ip_noise_gamma:
        gamma = options.ip_noise_gamma
        if options.ip_noise_gamma_random_strength:
            gamma = gamma * torch.rand((), generator=generator).item()
        return noise, noise + gamma * torch.randn(shape, generator=generator)
    return noise, noise


def apply_noise_offset(noise: torch.Tensor, offset, generator: torch.Generator) -> torch.Tensor:
    """noise + offset * N(0, 1) drawn once per sample and channel (shifts the mean brightness); `offset` a
    number or one per sample and channel (B, C, 1, 1)."""
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
        sigma = objective.snr(timesteps).rsqrt()  # sqrt((1 - abar) / abar); flow matching: s / (1 - s)
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
    prediction = objective.model_output(prediction, noisy, timesteps)
    target = objective.target(latents, noise, timesteps)
    huber_c = huber_threshold(objective, timesteps, options) if options.loss_type in ("huber", "smooth_l1") else None
    per_element = element_loss(prediction, target, options.loss_type, huber_c)
    weights = objective.loss_weights(timesteps, options)
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


# ---- flow matching (SD3, FLUX.1) ------------------------------------------------------------------

FLOW_KEYS = ("timestep_sampling", "sigmoid_scale", "discrete_flow_shift", "model_prediction_type",
             "weighting_scheme", "logit_mean", "logit_std", "mode_scale")
TIMESTEP_SAMPLINGS = ("sigma", "uniform", "sigmoid", "shift", "flux_shift")
WEIGHTING_SCHEMES = ("none", "uniform", "sigma_sqrt", "logit_normal", "mode", "cosmap")
MODEL_PREDICTION_TYPES = ("raw", "additive", "sigma_scaled")


@dataclass
class FlowMatchObjective:
    """Rectified flow: x_s = (1 - s) x_0 + s noise for s in [0, 1], and the denoiser predicts the velocity
    noise - x_0. Timesteps are s * num_train_timesteps as floats (what diffusers' flow schedulers and
    sd-scripts pass around); the defaults are sd-scripts' FLUX.1 defaults.

    timestep_sampling (sd-scripts): uniform s ~ U(0, 1); sigmoid s = sigmoid(sigmoid_scale * N(0, 1));
    shift: that sigmoid, then s -> shift s / (1 + (shift - 1) s) with shift = discrete_flow_shift;
    flux_shift: that sigmoid, then FLUX's resolution-dependent shift exp(mu) / (exp(mu) + 1/s - 1), mu linear
    in the packed sequence length (h/2)(w/2) from 0.5 at 256 to 1.15 at 4096; qwen_shift: the same with
    Qwen-Image's constants (0.5 at 256 to 0.9 at 8192); sigma: u from the
    weighting_scheme's density (logit_normal: sigmoid(N(logit_mean, logit_std)); mode: 1 - u - mode_scale
    (cos^2(pi u / 2) - 1 + u); else uniform), picked from the 1000-entry table of diffusers'
    FlowMatchEulerDiscreteScheduler(shift = discrete_flow_shift): s = shifted((T - floor(u T)) / T).
    model_prediction_type: raw (the output is the velocity), additive (output + x_s), sigma_scaled
    (x_s - s output, with the loss weighted by weighting_scheme: sigma_sqrt s^-2, cosmap
    2 / (pi (1 - 2 s + 2 s^2))); the target is noise - x_0 in all three, as in sd-scripts' FLUX training."""
    num_train_timesteps: int = 1000
    timestep_sampling: str = "sigma"
    sigmoid_scale: float = 1.0
    discrete_flow_shift: float = 3.0
    model_prediction_type: str = "sigma_scaled"
    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    min_timestep: int = 0
    max_timestep: int | None = None
    prediction_type: str = "flow_matching"  # metadata (modelspec.prediction_type)

    @property
    def num_timesteps(self) -> int:
        return self.num_train_timesteps

    def sample_timesteps(self, batch: int, generator: torch.Generator, latent_shape=None) -> torch.Tensor:
        """s * T (float32) for `batch` examples; flux_shift needs the latents' (.., h, w)."""
        s = sample_sigmas(self, batch, generator, latent_shape).double()
        high = self.max_timestep if self.max_timestep is not None else self.num_train_timesteps
        if self.min_timestep > 0 or high < self.num_train_timesteps:  # the [min, max) range of timesteps
            s = (self.min_timestep + s * (high - self.min_timestep)) / self.num_train_timesteps
        return (s * self.num_train_timesteps).float()

    def sigmas(self, timesteps: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
        s = timesteps.detach().double().cpu() / self.num_train_timesteps
        if like is None:
            return s
        return s.to(like.device, like.dtype).view((-1,) + (1,) * (like.dim() - 1))

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        s = self.sigmas(timesteps, latents)
        return (1 - s) * latents + s * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return noise - latents

    def model_output(self, prediction: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.model_prediction_type == "additive":
            return prediction + noisy
        if self.model_prediction_type == "sigma_scaled":
            return prediction * -self.sigmas(timesteps, prediction) + noisy
        return prediction

    def loss_weights(self, timesteps: torch.Tensor, options: "LossOptions" = None):
        """Per-sample weights: weighting_scheme's, applied with sigma_scaled only (as sd-scripts); None if all 1."""
        if self.model_prediction_type != "sigma_scaled":
            return None
        weight = flow_loss_weighting(self.weighting_scheme, self.sigmas(timesteps))
        return None if torch.equal(weight, torch.ones_like(weight)) else weight.float()

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """((1 - s) / s)^2: signal over noise amplitude, squared (huber's snr schedule uses it)."""
        s = self.sigmas(timesteps).clamp(1e-6, 1 - 1e-6)
        return ((1 - s) / s) ** 2


def flow_shift(s: torch.Tensor, shift: float) -> torch.Tensor:
    """The SD3 / discrete-flow shift: shift s / (1 + (shift - 1) s)."""
    return shift * s / (1 + (shift - 1) * s)


# Qwen-Image's resolution-dependent shift (its scheduler: mu from 0.5 at 256 packed tokens to 0.9 at 8192, about
# exp(mu) = 2.3 at 1328px), musubi-tuner's timestep_sampling = "qwen_shift"
QWEN_IMAGE_SHIFT = (0.5, 0.9, 256, 8192)


def flux_time_shift(s: torch.Tensor, image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15,
                    base_len: int = 256, max_len: int = 4096) -> torch.Tensor:
    """FLUX.1's resolution-dependent shift: exp(mu) / (exp(mu) + 1/s - 1), mu linear in the sequence length."""
    mu = base_shift + (max_shift - base_shift) * (image_seq_len - base_len) / (max_len - base_len)
    return math.exp(mu) / (math.exp(mu) + (1 / s - 1))


def density_sample(scheme: str, batch: int, generator: torch.Generator, logit_mean: float = 0.0,
                   logit_std: float = 1.0, mode_scale: float = 1.29) -> torch.Tensor:
    """u in [0, 1) from the weighting scheme's density (the SD3 paper's logit-normal and mode sampling)."""
    if scheme == "logit_normal":
        return torch.sigmoid(torch.randn((batch,), generator=generator, dtype=torch.float64) * logit_std + logit_mean)
    u = torch.rand((batch,), generator=generator, dtype=torch.float64)
    if scheme == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def flow_loss_weighting(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """sigma_sqrt: s^-2; cosmap: 2 / (pi (1 - 2 s + 2 s^2)); otherwise ones."""
    if scheme == "sigma_sqrt":
        return sigmas.clamp_min(1e-6) ** -2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    return torch.ones_like(sigmas)


def sample_sigmas(o: FlowMatchObjective, batch: int, generator: torch.Generator, latent_shape=None) -> torch.Tensor:
    """s in [0, 1] per example, by o.timestep_sampling (float64)."""
    mode = o.timestep_sampling
    if mode == "uniform":
        return torch.rand((batch,), generator=generator, dtype=torch.float64)
    if mode in ("sigmoid", "shift", "flux_shift", "qwen_shift"):
        s = torch.sigmoid(o.sigmoid_scale * torch.randn((batch,), generator=generator, dtype=torch.float64))
        if mode == "shift":
            return flow_shift(s, o.discrete_flow_shift)
        if mode in ("flux_shift", "qwen_shift"):
            if latent_shape is None:
                raise ValueError(f"timestep_sampling = {mode} needs the latents' size")
            h, w = latent_shape[-2], latent_shape[-1]
            return flux_time_shift(s, (h // 2) * (w // 2), *QWEN_IMAGE_SHIFT if mode == "qwen_shift" else ())
        return s
    u = density_sample(o.weighting_scheme, batch, generator, o.logit_mean, o.logit_std, o.mode_scale)
    T = o.num_train_timesteps
    index = (u * T).long().clamp(0, T - 1)
    return flow_shift((T - index).double() / T, o.discrete_flow_shift)


SNR_OPTIONS = {"min_snr_gamma": "Min-SNR weighting", "debiased_estimation_loss": "debiased estimation",
               "scale_v_pred_loss_like_noise_pred": "v-prediction loss scaling", "zero_terminal_snr":
               "zero terminal SNR"}


def configure_flow(objective: FlowMatchObjective, loss_section) -> tuple[FlowMatchObjective, "LossOptions"]:
    """The [loss] section for a flow-matching family: the flow keys set (None keeps the family's default),
    and the DDPM/SNR-only options refused."""
    import dataclasses as dc

    from library.config import ConfigError

    refused = [f"'loss.{k}' ({what})" for k, what in SNR_OPTIONS.items() if getattr(loss_section, k, None)]
    if refused:
        raise ConfigError(f"{', '.join(refused)}: made for the DDPM noise schedule (SD1/SDXL); this model trains "
                          f"with flow matching, use 'loss.weighting_scheme' / 'loss.timestep_sampling' instead")
    changes = {k: getattr(loss_section, k) for k in FLOW_KEYS if getattr(loss_section, k, None) is not None}
    if changes.get("weighting_scheme") == "uniform":
        changes["weighting_scheme"] = "none"
    objective = dc.replace(objective, **changes, min_timestep=loss_section.min_timestep,
                           max_timestep=loss_section.max_timestep)
    fields = LossOptions.__dataclass_fields__
    return objective, LossOptions(**{k: getattr(loss_section, k) for k in fields})
