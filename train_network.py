"""Train an adapter (LoRA, LoCon) on a latent-diffusion model.

    accelerate launch train_network.py --config my_lora.toml [--set section.key=value ...]
    python train_network.py --config_file sd_scripts_flat.toml

The whole run reads top to bottom: config -> data -> model -> adapters -> memory switches -> caches
-> optimizer -> the training loop -> files.
"""
from __future__ import annotations

import math
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from library import cli
from library.config import Config, write_resolved
from library.data.dataset import ImageCaptionDataset, collate, scan_folder
from library.families import ModelSource, get_family
from library.evaluation import fixed_denoising_loss
from library.memory import (allow_fp16_gradients, cast_frozen, cast_trainable, enable_gradient_checkpointing,
                            set_attention, weight_dtype)
from library.objectives import LossOptions, configure, denoising_loss, draw_noise
from library.optim import build_optimizer, build_scheduler
from library.progress import Progress
from library.sampling import read_prompts, render_samples
from networks import kohya
from networks.lora import LoraSettings, inject, set_adapters_enabled, trainable_parameter_count


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # one per optimizer step
    adapter_path: Path | None = None
    saved: list[Path] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)
    base_loss: float | None = None  # report_denoising_loss: adapter off
    trained_loss: float | None = None  # ... adapter on
    parts: object = None
    adapted: list = field(default_factory=list)
    optimizer: object = None


def main(argv: list[str] | None = None) -> int:
    cli.quiet_libraries()
    cfg = cli.load_or_exit(cli.parse_args(argv, __doc__), recipe="network")
    train(cfg)
    return 0


def train(cfg: Config) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    t, out_dir = cfg.train, Path(cfg.train.output_dir)
    if t.seed is None:
        t.seed = random.randint(0, 2**31 - 1)  # recorded in the resolved config
    accelerator = Accelerator(mixed_precision=t.mixed_precision,
                              gradient_accumulation_steps=t.gradient_accumulation_steps,
                              log_with=cfg.logging.log_with,
                              project_dir=cfg.logging.logging_dir or str(out_dir / "logs"))
    set_seed(t.seed)
    say = Progress(0, enabled=accelerator.is_main_process).write
    if accelerator.is_main_process:
        write_resolved(cfg, out_dir / f"{t.output_name}-config.toml")

    # ---- data: every image and caption is checked before any model loads ----------------------
    width, height = _resolution(cfg.dataset.resolution)
    items, notes = scan_folder(cfg.dataset.train_data_dir, cfg.dataset.num_repeats, cfg.dataset.caption_extension)
    for note in notes:
        say(f"note: {note}")
    dataset = ImageCaptionDataset(items, width, height)
    batch_size, accumulation = cfg.dataset.train_batch_size, t.gradient_accumulation_steps
    steps_per_epoch = math.ceil(math.ceil(len(dataset) / batch_size) / accumulation)
    max_steps = t.max_train_epochs * steps_per_epoch if t.max_train_epochs else t.max_train_steps
    say(f"data: {len(items)} images x repeats = {len(dataset)} per epoch; batch {batch_size}, "
        f"accumulation {accumulation} -> {steps_per_epoch} steps per epoch; {max_steps} steps "
        f"(~{math.ceil(max_steps / steps_per_epoch)} epochs) at {width}x{height}")

    # ---- model ----------------------------------------------------------------------------------
    m = cfg.model
    family = get_family(m.family, m.pretrained_model_name_or_path)
    parts = family.load(ModelSource(m.pretrained_model_name_or_path, v2=m.v2, v_parameterization=m.v_parameterization,
                                    tokenizer=m.tokenizer, arch=m.arch, vae=m.vae))
    objective, loss_options = configure(family.objective(parts), cfg.loss)
    modules = [parts.denoiser, parts.vae, *parts.text_encoders.values()]
    for module in modules:
        module.requires_grad_(False)

    # ---- adapters -------------------------------------------------------------------------------
    n = cfg.network
    settings = LoraSettings.from_network_section(n)
    wanted = {"denoiser": not n.network_train_text_encoder_only}
    adapted = []
    for target in family.adapter_targets(parts):
        if wanted.get(target.component, not n.network_train_unet_only):
            module = parts.denoiser if target.component == "denoiser" else parts.text_encoders[target.component]
            adapted.append(inject(module, target, settings))
    if n.network_weights:
        loaded = kohya.load_into(adapted, n.network_weights)
        say(f"continuing from {n.network_weights}: {loaded} layers")
    train_te = any(c.target.component != "denoiser" for c in adapted)
    say(f"adapters: {sum(len(c.layers) for c in adapted)} layers, "
        f"{trainable_parameter_count(adapted):,} trainable parameters (dim {settings.dim}, alpha {settings.alpha:g}"
        f"{f', conv_dim {settings.conv_dim}, conv_alpha {settings.conv_alpha:g}' if settings.conv_dim else ''})")

    # ---- memory switches ------------------------------------------------------------------------
    dtype = weight_dtype(t.mixed_precision)
    for module in modules:
        cast_frozen(module, dtype)
    if t.full_fp16 or t.full_bf16:
        cast_trainable([p for c in adapted for p in c.parameters()], dtype)
    attention = set_attention(parts.denoiser, t.xformers, t.sdpa)
    if t.gradient_checkpointing:
        enable_gradient_checkpointing(parts.denoiser, [c.module for c in adapted if c.module is not parts.denoiser])
    for module in modules:
        module.to(accelerator.device)
    say(f"precision: weights {dtype}, autocast {t.mixed_precision}; attention {attention}; "
        f"gradient checkpointing {'on' if t.gradient_checkpointing else 'off'}")

    # ---- caches ---------------------------------------------------------------------------------
    clip_skip = m.clip_skip
    if cfg.dataset.cache_latents:
        dataset.latents = _encode_all_images(family, parts, dataset, t.seed)
    cached_conditioning = None
    if t.cache_text_encoder_outputs:
        with torch.no_grad():
            cached_conditioning = {c: family.encode_prompts(parts, [c], clip_skip) for c in dataset.captions}

    # ---- optimizer ------------------------------------------------------------------------------
    o = cfg.optimizer
    groups = []
    for component in adapted:
        lr = n.unet_lr if component.target.component == "denoiser" else n.text_encoder_lr
        groups.append({"params": component.parameters(), "lr": lr if lr is not None else o.learning_rate})
    optimizer = build_optimizer(o.optimizer_type, groups, o.learning_rate, o.optimizer_args)
    scheduler = build_scheduler(o.lr_scheduler, optimizer, o.lr_warmup_steps, max_steps,
                                o.lr_scheduler_num_cycles, o.lr_scheduler_power)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(t.seed),
                                         num_workers=cfg.dataset.max_data_loader_n_workers)
    trained_modules = [c.module for c in adapted]
    optimizer, loader, *trained_modules = accelerator.prepare(optimizer, loader, *trained_modules)
    if t.full_fp16:
        allow_fp16_gradients(accelerator)
    params = [p for c in adapted for p in c.parameters()]

    result = TrainResult(parts=parts, adapted=adapted, optimizer=optimizer)
    if cfg.logging.report_denoising_loss:
        set_adapters_enabled(adapted, False)
        result.base_loss = fixed_denoising_loss(family, parts, objective, dataset, clip_skip, t.seed)
        set_adapters_enabled(adapted, True)
    if cfg.logging.log_with:
        hparams = {f"{section}.{key}": value if isinstance(value, (int, float, str, bool)) else str(value)
                   for section, values in cfg.to_toml_dict().items() for key, value in values.items()}
        accelerator.init_trackers((cfg.logging.log_prefix or "") + t.output_name, config=hparams)

    # ---- the training loop ----------------------------------------------------------------------
    def save(path: Path, step: int, epoch: int) -> None:
        if accelerator.is_main_process:
            _save_adapter(path, adapted, cfg, family, parts, settings, step, epoch, items, started_at)
            result.saved.append(path)

    started_at = time.time()
    noise_generator = torch.Generator().manual_seed(t.seed)
    progress = Progress(max_steps, every=cfg.logging.log_every_n_steps, enabled=accelerator.is_main_process)
    step, epoch = 0, 0
    while step < max_steps:
        epoch += 1
        for module in trained_modules:
            module.train()
        micro_losses = []
        for batch in loader:
            with accelerator.accumulate(*trained_modules), accelerator.autocast():
                loss = _batch_loss(family, parts, objective, batch, clip_skip, noise_generator,
                                   cached_conditioning, train_te, loss_options)
                accelerator.backward(loss)
                if accelerator.sync_gradients and o.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, o.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            micro_losses.append(loss.item())
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            step += 1
            result.losses.append(sum(micro_losses) / len(micro_losses))
            micro_losses = []
            lr = scheduler.get_last_lr()[0]
            progress.update(step, result.losses[-1], lr)
            accelerator.log({"loss": result.losses[-1], "lr": lr}, step=step)
            if cfg.save.save_every_n_steps and step % cfg.save.save_every_n_steps == 0 and step < max_steps:
                save(out_dir / f"{t.output_name}-step{step:08d}.safetensors", step, epoch)
            if step >= max_steps:
                break
        if cfg.save.save_every_n_epochs and epoch % cfg.save.save_every_n_epochs == 0 and step < max_steps:
            save(out_dir / f"{t.output_name}-{epoch:06d}.safetensors", step, epoch)
    elapsed = progress.close()

    # ---- files ----------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    result.adapter_path = out_dir / f"{t.output_name}.safetensors"
    save(result.adapter_path, step, epoch)
    for module in trained_modules:
        module.eval()
    if cfg.logging.report_denoising_loss:
        result.trained_loss = fixed_denoising_loss(family, parts, objective, dataset, clip_skip, t.seed)
        say(f"denoising loss at fixed timesteps and noise: base {result.base_loss:.5f} -> "
            f"trained {result.trained_loss:.5f}")
    if cfg.sample.sample_prompts and accelerator.is_main_process:
        s = cfg.sample
        result.samples = render_samples(family, parts, read_prompts(s.sample_prompts), out_dir / "samples",
                                        f"{t.output_name}_final", width, height, s.sample_steps, s.sample_seed,
                                        s.sample_sampler, clip_skip)
    accelerator.end_training()
    say(f"done: {step} steps in {elapsed:.1f}s, final loss {result.losses[-1]:.4f}; "
        f"adapter {result.adapter_path}" + (f"; samples in {out_dir / 'samples'}" if result.samples else ""))
    return result


def _resolution(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (value[0], value[1])


def _batch_loss(family, parts, objective, batch, clip_skip, generator, cached_conditioning, train_te,
                loss_options: LossOptions):
    """The loss of one batch: latents (cached or encoded now), conditioning, noise, timesteps, prediction."""
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
    noise, input_noise = (n.to(latents.device, latents.dtype) for n in
                          draw_noise(latents.shape, generator, loss_options))
    timesteps = objective.sample_timesteps(latents.shape[0], generator)
    return denoising_loss(family, parts, objective, latents, conditioning, noise, timesteps,
                          options=loss_options, input_noise=input_noise)


@torch.no_grad()
def _encode_all_images(family, parts, dataset: ImageCaptionDataset, seed: int) -> list[torch.Tensor]:
    from library.data.dataset import load_image

    generator = torch.Generator().manual_seed(seed)
    latents = []
    for item in dataset.items:
        pixels = load_image(item.path, dataset.width, dataset.height).unsqueeze(0)
        latents.append(family.encode_images(parts, pixels, generator)[0].cpu())
    return latents


def _save_adapter(path, adapted, cfg: Config, family, parts, settings, step, epoch, items, started_at) -> None:
    tags = Counter(tag.strip() for item in items for tag in item.caption.split(",") if tag.strip())
    training = {
        "started_at": started_at, "output_name": cfg.train.output_name, "learning_rate": cfg.optimizer.learning_rate,
        "unet_lr": cfg.network.unet_lr, "text_encoder_lr": cfg.network.text_encoder_lr, "steps": step,
        "epoch": epoch, "max_train_steps": cfg.train.max_train_steps, "seed": cfg.train.seed,
        "mixed_precision": cfg.train.mixed_precision, "clip_skip": cfg.model.clip_skip, "num_images": len(items),
        "resolution": list(_resolution(cfg.dataset.resolution)),
        "tag_frequency": {Path(cfg.dataset.train_data_dir).name: dict(tags)},
        "prediction_type": family.objective(parts).prediction_type,
    }
    network = {"module": cfg.network.network_module, "dim": settings.dim, "alpha": settings.alpha,
               "args": settings.as_args(), "dropout": settings.dropout}
    tensors = kohya.state_dict(adapted, kohya.SAVE_DTYPES[cfg.save.save_precision])
    kohya.save(path, tensors, kohya.metadata(family.file_metadata(parts), network, training))


if __name__ == "__main__":
    sys.exit(main())
