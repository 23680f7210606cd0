"""Did it learn? The denoising loss on the training images at fixed timesteps and fixed noise, so two
models (the base, and the base with the trained adapter) are compared on exactly the same problems."""
from __future__ import annotations

import numpy as np
import torch

from library.objectives import denoising_loss

FIXED_TIMESTEPS = (100, 300, 500, 700, 900)


@torch.no_grad()
def fixed_denoising_loss(family, parts, objective, dataset, clip_skip: int, seed: int = 0,
                         max_images: int = 8, timesteps=FIXED_TIMESTEPS, cached: dict | None = None) -> float:
    """Mean loss over the first `max_images` images x `timesteps`, with noise drawn from `seed`. `cached`: the
    run's cached text-encoder outputs (caption -> conditioning), used instead of encoding again (the encoders
    then are on the host)."""
    generator = torch.Generator().manual_seed(seed)
    device = parts.denoiser.device
    losses = []
    for index in range(min(max_images, len(dataset.items))):
        example = dataset.plain_example(index)
        caption = example["caption"]
        if "latents" in example:
            latents = example["latents"].unsqueeze(0).to(device)
        else:
            latents = family.encode_images(parts, example["pixels"].unsqueeze(0), generator)
        conditioning = cached[caption] if cached else family.encode_prompts(parts, [caption], clip_skip)
        conditioning = {k: v.to(device) for k, v in conditioning.items()}
        for t in timesteps:
            noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
            loss = denoising_loss(family, parts, objective, latents, conditioning, noise, torch.tensor([t]))
            losses.append(loss.item())
    return sum(losses) / len(losses)


def validation_timesteps(objective) -> list[int]:
    """sd-scripts' four validation timesteps: evenly inside [min_timestep, max_timestep] (200, 400, 600, 800)."""
    low = objective.min_timestep or 0
    high = objective.max_timestep if objective.max_timestep is not None else objective.num_timesteps
    return [int(t) for t in np.linspace(low, high, 6, dtype=int)[1:-1]]


@torch.no_grad()
def validation_loss(family, parts, objective, held_out, clip_skip: int, seed: int, options=None,
                    cached_conditioning: dict | None = None, train_te: bool = False,
                    max_images: int | None = None) -> float:
    """The mean loss over the held-out images (the first `max_images`) x validation_timesteps, with the noise
    drawn from `seed` each time: the same problems at every validation, so the values compare."""
    from library.objectives import LossOptions, draw_noise
    from library.training import text_conditioning

    options = options or LossOptions()
    generator = torch.Generator().manual_seed(seed)
    device = parts.denoiser.device
    losses = []
    for index in range(min(max_images or len(held_out.items), len(held_out.items))):
        example = held_out.plain_example(index)
        if "latents" in example:
            latents = example["latents"].unsqueeze(0).to(device, next(parts.vae.parameters()).dtype)
        else:
            latents = family.encode_images(parts, example["pixels"].unsqueeze(0), generator).to(device)
        text = text_conditioning(family, parts, [example["caption"]], clip_skip, cached_conditioning, train_te,
                                 device)
        conditioning = family.conditioning_for_batch(parts, {"caption": [example["caption"]]}, text, latents)
        for t in validation_timesteps(objective):
            noise, input_noise = (n.to(device, latents.dtype) for n in draw_noise(latents.shape, generator, options))
            losses.append(denoising_loss(family, parts, objective, latents, conditioning, noise, torch.tensor([t]),
                                         options=options, input_noise=input_noise).item())
    return sum(losses) / len(losses)
