"""The pieces of a training step both recipes share: the loss of one batch, and encoding the images once
for cache_latents. Each recipe keeps its own loop; what a step computes lives here, once."""
from __future__ import annotations

import torch

from library.objectives import LossOptions, denoising_loss, draw_noise
from library.data.training_set import latent_mask


def resolution(value) -> tuple[int, int]:
    """dataset.resolution (an int, or [width, height]) as (width, height)."""
    return (value, value) if isinstance(value, int) else (value[0], value[1])


def batch_loss(family, parts, objective, batch: dict, clip_skip: int, generator: torch.Generator,
               cached_conditioning: dict | None, train_te: bool, loss_options: LossOptions) -> torch.Tensor:
    """The loss of one batch: latents (cached or encoded now), conditioning (cached or encoded now, with
    gradients when the text encoder trains), noise and timesteps from `generator`, prediction, loss."""
    if "latents" in batch:
        latents = batch["latents"].to(parts.denoiser.device)
    else:
        with torch.no_grad():
            latents = family.encode_images(parts, batch["pixels"])
    if cached_conditioning is not None:
        conditioning = {k: torch.cat([cached_conditioning[c][k] for c in batch["caption"]])
                        for k in next(iter(cached_conditioning.values()))}
    else:
        with torch.set_grad_enabled(train_te):
            conditioning = family.encode_prompts(parts, batch["caption"], clip_skip)
    conditioning = family.conditioning_for_batch(parts, batch, conditioning, latents)
    noise, input_noise = (n.to(latents.device, latents.dtype) for n in
                          draw_noise(latents.shape, generator, loss_options))
    timesteps = objective.sample_timesteps(latents.shape[0], generator, latent_shape=latents.shape)
    return denoising_loss(family, parts, objective, latents, conditioning, noise, timesteps,
                          mask=latent_mask(batch, latents), sample_weights=batch.get("loss_weight"),
                          options=loss_options, input_noise=input_noise)


@torch.no_grad()
def encode_all_images(family, parts, dataset, seed: int) -> list[torch.Tensor]:
    """Latents of every image of the dataset (in dataset.items order), on the CPU."""
    from library.data.dataset import load_image

    generator = torch.Generator().manual_seed(seed)
    latents = []
    for item in dataset.items:
        pixels = load_image(item.path, dataset.width, dataset.height).unsqueeze(0)
        latents.append(family.encode_images(parts, pixels, generator)[0].cpu())
    return latents
