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
               cached_conditioning: dict | None, train_te: bool, loss_options: LossOptions,
               shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """The loss of one batch: latents (cached or encoded now), conditioning (cached or encoded now, with
    gradients when the text encoder trains), noise and timesteps from `generator`, prediction, loss.

    shard = (rank, processes): every process draws the noise and timesteps of the whole global batch from
    the same generator and uses its own slice, so N processes train exactly as one process would on the
    global batch."""
    if "latents" in batch:  # in the dtype a fresh encoding has (half precision without autocast: the CPU)
        latents = batch["latents"].to(parts.denoiser.device, next(parts.vae.parameters()).dtype)
    else:
        with torch.no_grad():
            latents = family.encode_images(parts, batch["pixels"])
    if "control_pixels" in batch:  # edit pairs: the reference images, encoded as the targets are
        with torch.no_grad():
            batch = {**batch, "control_latents": family.encode_images(parts, batch["control_pixels"])}
    with torch.set_grad_enabled(train_te and torch.is_grad_enabled()):
        conditioning = text_conditioning(family, parts, batch["caption"], clip_skip, cached_conditioning, train_te,
                                         latents.device)
    conditioning = family.conditioning_for_batch(parts, batch, conditioning, latents)
    rank, processes = shard
    size = latents.shape[0]
    shape = (size * processes, *latents.shape[1:])
    mine = slice(rank * size, (rank + 1) * size)
    means = _latent_means(latents, shape, mine) if loss_options.adaptive_noise_scale else None  # a copy: a sync
    noise, input_noise = (n[mine].to(latents.device, latents.dtype)
                          for n in draw_noise(shape, generator, loss_options, means))
    timesteps = objective.sample_timesteps(shape[0], generator, latent_shape=shape)[mine]
    return denoising_loss(family, parts, objective, latents, conditioning, noise, timesteps,
                          mask=latent_mask(batch, latents), sample_weights=batch.get("loss_weight"),
                          options=loss_options, input_noise=input_noise)


def text_conditioning(family, parts, captions: list[str], clip_skip: int, cached_conditioning: dict | None,
                      train_te: bool, device) -> dict[str, torch.Tensor]:
    """The captions' text conditioning: from the cache (all of it; or, with trained text encoders, the
    cached_apart encoder's share, the others running now), else encoded now. The cache is kept on the host:
    this batch's share comes to `device` (pinned on CUDA: asynchronously)."""
    if cached_conditioning is None:
        return family.encode_prompts(parts, captions, clip_skip)
    first = next(iter(cached_conditioning.values()))
    cached = {k: _cat_padded([cached_conditioning[c][k].to(device, non_blocking=True) for c in captions])
              for k in first}
    return family.encode_prompts(parts, captions, clip_skip, t5=cached) if train_te else cached


def _cat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Cached outputs of a batch's captions, concatenated; outputs of different lengths (token sequences padded to
    their own encoding batch's longest: Qwen-Image) padded with zeros (masked out) along dim 1 first."""
    longest = max(t.shape[1] for t in tensors) if tensors[0].dim() > 1 else 0
    if any(t.shape[1] != longest for t in tensors):
        tensors = [torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, longest - t.shape[1])) for t in tensors]
    return torch.cat(tensors)


def _latent_means(latents: torch.Tensor, shape: tuple, mine: slice) -> torch.Tensor:
    """|mean over H, W| of each latent channel, placed in the global batch (other processes' rows zero: the
    noise of this process' rows depends on its own rows only), for adaptive_noise_scale."""
    means = torch.zeros((shape[0], shape[1], 1, 1))
    means[mine] = latents.detach().float().mean(dim=(2, 3), keepdim=True).abs().cpu()
    return means


# ---- what both recipes do around the step: data, loader --------------------------------


def prepare_data(cfg, say, planned=None):
    """The data plan (checked before any model loads: library/data/plan.py plan_training, which main() runs
    before torch loads and passes on as `planned`), the dataset, the sample size and the step count.
    Returns (plan, dataset, (width, height), steps_per_epoch, max_steps)."""
    from library.data.plan import plan_training
    from library.data.training_set import TrainingSet
    from library.engines import launched_processes

    check_precision_on_device(cfg)  # fp16 on a device that cannot run it: before any model loads
    plan, max_steps = planned or plan_training(cfg, say)
    dataset = TrainingSet(plan, cfg.train.seed, cfg.dataset.prior_loss_weight)
    steps_per_epoch = plan.steps_per_epoch(cfg.train.gradient_accumulation_steps, launched_processes())
    if dataset.warms_up:  # token warmup: which optimizer step each batch belongs to (one process per batch)
        processes = launched_processes()
        dataset.step_clock = (plan.steps_per_epoch(1), cfg.train.gradient_accumulation_steps * processes, max_steps)
    return plan, dataset, plan.layout.datasets[0].buckets.resolution, steps_per_epoch, max_steps


def held_out_set(cfg, plan, say):
    """The held-out images of train.validation_split as a dataset (no augmentation is used on them), or None."""
    from library.data.plan import DataPlan
    from library.data.training_set import TrainingSet

    if not plan.validation:
        return None
    say(f"validation: {len(plan.validation)} images held out ({cfg.train.validation_split:g} of each training "
        f"subset), their loss at 4 fixed timesteps and fixed noise")
    held = DataPlan(plan.layout, plan.validation, list(range(len(plan.validation))))
    return TrainingSet(held, cfg.train.seed, cfg.dataset.prior_loss_weight)


def validation_seed(cfg) -> int:
    t = cfg.train
    return t.validation_seed if t.validation_seed is not None else t.seed


def validation_images(cfg, plan) -> int | None:
    """max_validation_steps batches of the first dataset's batch size, in images (None: all)."""
    steps = cfg.train.max_validation_steps
    return None if steps is None else steps * plan.layout.datasets[0].batch_size


def check_precision_on_device(cfg) -> None:
    """accelerate does not autocast fp16 on the CPU: the frozen weights are fp16 and every input must be too,
    which a VAE kept in fp32 (no_half_vae) breaks. Said before any model loads."""
    from accelerate import PartialState

    from library.config import ConfigError

    t = cfg.train
    if t.mixed_precision == "fp16" and t.no_half_vae and PartialState().device.type == "cpu":
        raise ConfigError(f"{cfg.source}: 'train.no_half_vae' with mixed_precision = \"fp16\" cannot run on the "
                          f"CPU (no fp16 autocast there: fp32 latents would meet fp16 weights); use "
                          f"mixed_precision = \"bf16\" or \"no\" on the CPU")


def initial_position(cfg, sampler, order, steps_per_epoch: int):
    """sd-scripts' skip_until_initial_step: the run starts after initial_step optimizer steps (or at initial_epoch's
    first step) on the data a full run has there: the skipped epochs' batch orders are drawn as the loader would
    draw them (no image is read) and the batches of the epoch in progress are skipped. Position() otherwise."""
    from library.checkpoint import Position

    t = cfg.train
    first = t.initial_step if t.initial_step is not None else (t.initial_epoch - 1) * steps_per_epoch \
        if t.initial_epoch else 0
    if not (t.skip_until_initial_step and first) or cfg.save.resume:
        return Position()
    epochs, rest = divmod(first * t.gradient_accumulation_steps, len(sampler))
    for _ in range(epochs):
        torch.empty((), dtype=torch.int64).random_(generator=order)  # the DataLoader's base seed of an epoch
        for _ in sampler:  # the epoch's batch order
            pass
    return Position(first, epochs + 1, rest, order.get_state())


def make_loader(cfg, plan, dataset):
    """Batches of one bucket each in a seeded order. Returns (loader, sampler, order generator): the
    generator's state at an epoch's start and the sampler's epoch are what a resumed run restores."""
    from library.data.buckets import BucketBatchSampler
    from library.data.training_set import collate

    order = torch.Generator().manual_seed(cfg.train.seed)
    sampler = BucketBatchSampler(dataset.bucket_keys, plan.batch_sizes, order, with_position=dataset.warms_up)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, generator=order,
                                         num_workers=cfg.dataset.max_data_loader_n_workers,
                                         pin_memory=torch.cuda.is_available())  # batches copy faster to the GPU
    return loader, sampler, order




def check_partial_cache(cfg, family, train_te: bool) -> None:
    """Cached text-encoder outputs with trained text encoders: only a family with an encoder cached apart
    (FLUX.1 / SD3: T5, while the CLIPs train) can; else the config error names the key."""
    from library.config import ConfigError

    t = cfg.train
    if (t.cache_text_encoder_outputs or t.cache_text_encoder_outputs_to_disk) and train_te and not family.cached_apart:
        raise ConfigError(f"{cfg.source}: 'train.cache_text_encoder_outputs' needs a frozen text encoder with "
                          f"{family.name} (only FLUX.1 / SD3 cache T5 while the CLIPs train): set "
                          f"'network.network_train_unet_only' = true")
