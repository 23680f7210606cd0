"""Did it learn? The denoising loss on the training images at fixed timesteps and fixed noise, so two
models (the base, and the base with the trained adapter) are compared on exactly the same problems."""
from __future__ import annotations

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
