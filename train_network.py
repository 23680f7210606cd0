"""Train an adapter (LoRA, LoCon) on a latent-diffusion model.

    accelerate launch train_network.py --config my_lora.toml [--set section.key=value ...]
    python train_network.py --config_file sd_scripts_flat.toml

The whole run reads top to bottom: config -> data -> model -> adapters -> memory switches -> caches
-> optimizer -> the training loop -> files.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from library import cli
from library.config import Config


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
    keys_scaled: list[int] = field(default_factory=list)  # scale_weight_norms: layers scaled, per step
    validation_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) on held-out images


def main(argv: list[str] | None = None) -> int:
    return cli.recipe_main(argv, __doc__, "network", train)


def train(cfg: Config, planned=None) -> TrainResult:
    """The run; `planned` is the data plan main() made before the heavy imports below (made here if None)."""
    import torch

    from library import phases
    from library.checkpoint import Checkpointer, Position
    from library.evaluation import fixed_denoising_loss, validation_loss
    from library.model_files import check_model_files, load_model, loading_errors
    from library.guards import NonFiniteGuard
    from library.loop import Bookkeeping, resume_position, sample_renderer
    from library.memory import peak_memory_text
    from library.objectives import configure
    from library.optim import schedule_of
    from library.progress import Progress, StepLog
    from library.run import (OptimizerSettings, Switches, adapter_groups, add_adapters, apply_switches,
                             cache_and_place, make_optimizer, prepare, quantize_frozen, start,
                             start_trackers)
    from library.sampling import settings_from_config
    from library.training import (batch_loss, check_partial_cache, held_out_set, make_loader,
                                  prepare_data, validation_images, validation_seed)
    from networks import files, max_norm
    from networks.ema import AdapterEMA
    from networks.settings import NetworkSettings
    from networks.targets import set_adapters_enabled, trainable_parameter_count

    t, out_dir = cfg.train, Path(cfg.train.output_dir)
    check_model_files(cfg)  # the model and adapter files, from their headers: before anything is written
    run = start(cfg, "network")  # seed, refusals, the accelerator, the output folder claimed
    accelerator, say = run.accelerator, run.say

    # ---- data: every image and caption is checked before any model loads ----------------------
    plan, dataset, (width, height), steps_per_epoch, max_steps = prepare_data(cfg, say, planned)
    held_out = held_out_set(cfg, plan, say)  # train.validation_split: images kept for the validation loss
    items = dataset.items
    sampling = settings_from_config(cfg, width, height)  # the prompt file, read and checked now

    # ---- model ----------------------------------------------------------------------------------
    m = cfg.model
    family, parts = load_model(cfg)
    objective, loss_options = configure(family.objective(parts), cfg.loss)
    quantized = quantize_frozen(parts, Switches.from_config(cfg))  # before the adapters: peft's QLoRA layers
    if quantized:
        say(f"base_model_precision {m.base_model_precision}: "
            + ", ".join(f"{name} {count} Linear layers" for name, count in quantized.items()))

    # ---- adapters -------------------------------------------------------------------------------
    n = cfg.network
    settings = NetworkSettings.from_network_section(n)
    adapted = add_adapters(family, parts, settings, not n.network_train_text_encoder_only,
                           not n.network_train_unet_only)
    if n.network_weights:
        with loading_errors(cfg):
            loaded = files.load_into(adapted, n.network_weights, family.file_metadata(parts))
        say(f"continuing from {n.network_weights}: {loaded} layers")
    train_te = any(c.target.component != "denoiser" for c in adapted)
    check_partial_cache(cfg, family, train_te)  # SD1 / SDXL: all text outputs cached, or none
    say(f"adapters: {settings.algo}, {sum(len(c.layers) for c in adapted)} layers, "
        f"{trainable_parameter_count(adapted):,} trainable parameters (dim {settings.dim}, alpha {settings.alpha:g}"
        f"{f', conv_dim {settings.conv_dim}, conv_alpha {settings.conv_alpha:g}' if settings.conv_dim else ''})")

    # ---- memory switches ------------------------------------------------------------------------
    params = [p for c in adapted for p in c.parameters()]
    placed = apply_switches(family, parts, Switches.from_config(cfg), params,
                            [c.module for c in adapted if c.module is not parts.denoiser], accelerator.device,
                            whole=False)
    swapper = placed.swapper
    say(f"precision: weights {placed.dtype}, autocast {t.mixed_precision}; attention {placed.attention}; "
        f"gradient checkpointing {'on' if t.gradient_checkpointing else 'off'}"
        + ("; fp8 base weights" if t.fp8_base else "") + (f"; {placed.compiled} blocks compiled" if placed.compiled
                                                          else "")
        + ("; checkpoints on the CPU" if t.cpu_offload_checkpointing else "")
        + (f"; {len(swapper.swapped)} blocks swapped ({swapper.host_ram() / 2**30:.2f} GiB of CPU RAM)"
           if swapper else ""))

    # ---- caches ---------------------------------------------------------------------------------
    clip_skip = m.clip_skip
    with accelerator.main_process_first():  # disk caches: written once, by the main process; read by the rest
        cached_conditioning = cache_and_place(cfg, family, parts, dataset, not train_te, accelerator.device, say,
                                              held_out)

    # ---- optimizer ------------------------------------------------------------------------------
    o, chosen = cfg.optimizer, OptimizerSettings.from_config(cfg)
    optimizer, _ = make_optimizer(chosen, adapter_groups(adapted, settings, n, o.learning_rate))
    scheduler = schedule_of(o, optimizer, max_steps)
    loader, sampler, order = make_loader(cfg, plan, dataset)
    trained_modules = [c.module for c in adapted]
    engine, optimizer, loader = prepare(accelerator, parts, trained_modules, optimizer, loader, chosen.fused,
                                        t.full_fp16)  # DDP with several processes (library/engines.py)

    result = TrainResult(parts=parts, adapted=adapted, optimizer=optimizer)
    if cfg.logging.report_denoising_loss:
        set_adapters_enabled(adapted, False)
        result.base_loss = fixed_denoising_loss(family, parts, objective, dataset, clip_skip, t.seed,
                                                cached=cached_conditioning)
        set_adapters_enabled(adapted, True)
    start_trackers(accelerator, cfg)

    # ---- resume, and the training loop -----------------------------------------------------------
    if settings.use_ema or cfg.dreambooth.use_ema:  # network_args "use_ema=True", or the use_ema key
        ema = AdapterEMA(params, settings.ema_decay if settings.use_ema else cfg.dreambooth.ema_decay)
    else:
        ema = None

    def save_weights(stem: str) -> list[Path]:
        path = out_dir / f"{stem}.safetensors"
        _save_adapter(path, adapted, cfg, family, parts, settings, step, epoch, items, started_at)
        if ema is None:
            return [path]
        with ema.applied():  # the averaged adapter beside the trained one (networks/ema.py)
            _save_adapter(path.with_name(f"{stem}-ema.safetensors"), adapted, cfg, family, parts, settings, step,
                          epoch, items, started_at, {"ss_ema_decay": f"{ema.decay:g}"})
        return [path, path.with_name(f"{stem}-ema.safetensors")]

    noise_generator = torch.Generator().manual_seed(t.seed)
    params_by_name = {f"{i}.{name}": p for i, c in enumerate(adapted) for name, p in c.module.named_parameters()
                      if p.requires_grad}
    checkpoints = Checkpointer(cfg, save_weights, params_by_name, optimizer, scheduler,
                         {"noise": noise_generator, "order": order}, accelerator.scaler,
                         extra=lambda: {"adapter_ema": ema.state_dict()} if ema is not None else {},
                         is_main=accelerator.is_main_process, say=say)
    position, extra = resume_position(cfg, checkpoints, order, sampler, steps_per_epoch)
    if ema is not None and cfg.save.resume:
        ema.load_state_dict(extra["adapter_ema"])
    guard = NonFiniteGuard(t.nan_skip_limit, say)

    def validate(step: int) -> None:
        log.flush()  # the trackers see the steps in order
        for module in trained_modules:
            module.eval()  # no adapter dropout
        value = validation_loss(family, parts, objective, held_out, clip_skip, validation_seed(cfg), loss_options,
                                cached_conditioning, train_te, validation_images(cfg, plan))
        for module in trained_modules:
            module.train()
        result.validation_losses.append((step, value))
        accelerator.log({"loss/validation": value}, step=step)
        say(f"validation loss at step {step}: {value:.5f}")

    def validate_every_n_steps(step: int) -> None:
        if held_out and t.validate_every_n_steps and step % t.validate_every_n_steps == 0:
            validate(step)

    def validate_every_n_epochs(step: int) -> None:
        if held_out and epoch % (t.validate_every_n_epochs or 1) == 0:
            validate(step)

    sample = sample_renderer(family, parts, sampling, accelerator, out_dir / "samples", t.output_name,
                             result.samples)
    started_at = time.time()
    progress = Progress(max_steps, every=cfg.logging.log_every_n_steps, enabled=accelerator.is_main_process)
    log = StepLog(progress, accelerator)  # each step's loss stays on the device until the logging cadence
    result.losses, result.keys_scaled = log.series("loss"), log.series("keys_scaled")
    books = Bookkeeping(accelerator, checkpoints, log, sampling, sample, max_steps, say)
    step, epoch, skip = position.step, position.epoch - (1 if position.epoch else 0), position.batches_done
    batches_done, epoch_order = skip, position.epoch_order
    end = checkpoints.at_the_end(position, max_steps)  # a state saved at the last step: no step is left
    if end:
        epoch = position.epoch
        if end == "finished":
            return result
    books.at_start(step)
    phases.enter("training")
    with books:  # SIGTERM / SIGINT: save and exit 75; the handlers restored after
        while step < max_steps:
            epoch += 1
            epoch_order = order.get_state()
            batches_done, batches = skip, accelerator.skip_first_batches(loader, skip) if skip else loader
            skip = 0
            for module in trained_modules:
                module.train()
            for batch in batches:
                batches_done += 1
                with accelerator.accumulate(*engine.engine_modules), accelerator.autocast():
                    loss = batch_loss(family, engine.step_parts, objective, batch, clip_skip, noise_generator,
                                      cached_conditioning, train_te, loss_options,
                                      (accelerator.process_index, accelerator.num_processes))
                    if guard.loss_ok(loss, accelerator.num_processes):
                        accelerator.backward(loss)
                    if accelerator.sync_gradients and guard.step_ok(params, o.max_grad_norm, step, accelerator):
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                log.add(loss)
                if not accelerator.sync_gradients:
                    continue
                scheduler.step()
                step += 1
                if ema is not None:
                    ema.update()
                norms = {}
                if n.scale_weight_norms:  # device scalars, read at the logging cadence
                    norms = dict(zip(("keys_scaled", "average_key_norm", "max_key_norm"),
                                     max_norm.apply(adapted, n.scale_weight_norms)))
                books.after_step(Position(step, epoch, batches_done, epoch_order), scheduler.get_last_lr()[0],
                                 also=validate_every_n_steps, **norms)
                if step >= max_steps:
                    break
            books.after_epoch(Position(step, epoch, batches_done, epoch_order), also=validate_every_n_epochs)
    log.flush()
    elapsed = progress.close()

    # ---- files ----------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    checkpoints.save(t.output_name, Position(step, epoch, batches_done, epoch_order))
    result.saved = checkpoints.saved
    result.adapter_path = out_dir / f"{t.output_name}.safetensors"
    for module in trained_modules:
        module.eval()
    if cfg.logging.report_denoising_loss:
        result.trained_loss = fixed_denoising_loss(family, parts, objective, dataset, clip_skip, t.seed,
                                                   cached=cached_conditioning)
        say(f"denoising loss at fixed timesteps and noise: base {result.base_loss:.5f} -> "
            f"trained {result.trained_loss:.5f}")
    sample(step)
    accelerator.log(phases.for_trackers(), step=step)  # the peak memory report, into the run's log too
    accelerator.end_training()
    if n.scale_weight_norms:
        say(f"scale_weight_norms {n.scale_weight_norms:g}: {sum(result.keys_scaled):.0f} layer scalings in {step} "
            f"steps ({result.keys_scaled[-1] if result.keys_scaled else 0:.0f} in the last)")
    say(f"done: {step} steps in {elapsed:.1f}s, "
        + (f"final loss {result.losses[-1]:.4f}, " if result.losses else "") + f"{peak_memory_text()}; "
        f"adapter {result.adapter_path}" + (f"; samples in {out_dir / 'samples'}" if result.samples else ""))
    return result


def _save_adapter(path, adapted, cfg: Config, family, parts, settings, step, epoch, items, started_at,
                  more: dict[str, str] | None = None) -> None:
    from collections import Counter

    from library.training import resolution
    from networks import files

    tags = Counter(tag.strip() for item in items for tag in item.caption.split(",") if tag.strip())
    training = {
        "started_at": started_at, "output_name": cfg.train.output_name, "learning_rate": cfg.optimizer.learning_rate,
        "unet_lr": cfg.network.unet_lr, "text_encoder_lr": cfg.network.text_encoder_lr, "steps": step,
        "epoch": epoch, "max_train_steps": cfg.train.max_train_steps, "seed": cfg.train.seed,
        "mixed_precision": cfg.train.mixed_precision, "clip_skip": cfg.model.clip_skip, "num_images": len(items),
        "resolution": list(resolution(cfg.dataset.resolution)),
        "tag_frequency": {Path(cfg.dataset.train_data_dir or cfg.dataset.dataset_config).name: dict(tags)},
        "prediction_type": family.objective(parts).prediction_type,
    }
    network = {**files.network_metadata(settings), "scale_weight_norms": cfg.network.scale_weight_norms,
               "loraplus_lr_ratio": cfg.network.loraplus_lr_ratio, "save_format": cfg.save.save_format}
    tensors, extra = files.adapter_tensors(adapted, cfg.save.save_format, files.SAVE_DTYPES[cfg.save.save_precision])
    meta = files.with_user_metadata(files.metadata(family.file_metadata(parts), network, training), cfg.save)
    files.save(path, tensors, {**meta, **extra, **(more or {}),
                               "ss_session_id": cfg.run_id})  # which run wrote it (library/outputs.py)


if __name__ == "__main__":
    sys.exit(main())
