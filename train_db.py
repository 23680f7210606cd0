"""DreamBooth / full fine-tuning of the denoiser (and optionally the text encoder), with prior preservation.

    accelerate launch train_db.py --config my_dreambooth.toml [--set section.key=value ...]

Reads top to bottom like train_network.py: config -> data -> model -> class images -> what trains ->
memory switches -> caches -> optimizer (plain or fused into backward) -> the training loop -> files.
"""
from __future__ import annotations

import dataclasses
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

from library import cli
from library.config import Config, write_resolved
from library.model_files import check_files
from library.outputs import claim_output_dir


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # one per optimizer step
    model_path: Path | None = None
    saved: list[Path] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)
    parts: object = None
    optimizer: object = None
    ema: object = None


def main(argv: list[str] | None = None) -> int:
    cli.quiet_libraries()
    args = cli.parse_args(argv, __doc__)
    cfg = cli.load_or_exit(args, recipe="db")
    if args.plan or args.vram_budget:  # the memory planner instead of training
        from library import planner

        return planner.run(cfg, "db", args.vram_budget)
    with cli.exit_on_user_error():
        check_files(cfg)  # the model and adapter files can be read (headers only): the first second of the run
        planned = cli.plan_data(cfg)  # every image and caption checked, before torch loads
        train(cfg, planned)
    return 0


def train(cfg: Config, planned=None) -> TrainResult:
    """The run; `planned` is the data plan main() made before the heavy imports below (made here if None)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from library import phases
    from library.block_swap import make_swapper, move
    from library.checkpoint import Checkpointer, Position, resumed_seed
    from library.devices import enable_tf32, refuse_unsupported
    from library.model_files import check_model_files, load_model
    from library.guards import EXIT_STOPPED, NonFiniteGuard, StopSignal
    from library.memory import (cast_frozen_parts, compile_blocks, enable_gradient_checkpointing,
                                offload_checkpoints, peak_memory_text, set_attention, weight_dtype)
    from library.objectives import configure
    from library.optim import FusedBackward, build_optimizer, build_scheduler
    from library.prior import ensure_class_images
    from library.progress import Progress, StepLog
    from library.quantization import store_t5
    from library.sampling import due, log_images, render_samples, settings_from_config
    from library.sd_flat import text_encoder_of_family
    from library.training import average_gradients, batch_loss, cache_outputs, make_loader, prepare_data

    t, db, out_dir = cfg.train, cfg.dreambooth, Path(cfg.train.output_dir)
    found = check_model_files(cfg)  # the model and adapter files, from their headers: before anything is written
    te_note = text_encoder_of_family(cfg, found and found.name)  # sd-scripts input: its script's text encoders
    if t.seed is None:
        t.seed = resumed_seed(cfg) or random.randint(0, 2**31 - 1)  # recorded in the resolved config
    refuse_unsupported(cfg)  # before anything starts or loads
    enable_tf32()
    accelerator = Accelerator(mixed_precision=t.mixed_precision,
                              gradient_accumulation_steps=t.gradient_accumulation_steps,
                              log_with=cfg.logging.log_with,
                              project_dir=cfg.logging.logging_dir or str(out_dir / "logs"))
    set_seed(t.seed)
    phases.start(accelerator.device)  # the peak memory of each phase, for the report at the end
    say = Progress(0, enabled=accelerator.is_main_process).write
    if accelerator.is_main_process:
        lock = claim_output_dir(cfg)  # noqa: F841  (held until train() returns: no second run writes here)
        write_resolved(cfg, out_dir / f"{t.output_name}-config.toml")

    # ---- data: every image and caption is checked before any model loads ----------------------
    plan, dataset, (width, height), steps_per_epoch, max_steps = prepare_data(cfg, say, planned)
    sampling = settings_from_config(cfg, width, height)  # the prompt file, read and checked now

    # ---- model, then class images from the untouched base model ----------------------------------
    m = cfg.model
    family, parts = load_model(cfg)
    te_note = te_note or text_encoder_of_family(cfg, family.name)  # a family only loading could tell
    if te_note:
        say(te_note)
    objective, loss_options = configure(family.objective(parts), cfg.loss)
    ema = _make_ema(parts.denoiser, db, accelerator.device) if db.use_ema else None  # made before .to(device)
    modules = [parts.denoiser, parts.vae, *parts.text_encoders.values()]
    if db.class_data_dir:  # prior preservation: the class images are the regularization images
        if db.class_prompt and db.num_class_images and accelerator.is_main_process:
            s = cfg.sample
            with accelerator.autocast():  # in the run's precision; one module at a time on the device
                made = ensure_class_images(family, parts, db.class_data_dir, db.class_prompt, db.num_class_images,
                                           (width, height), s.sample_steps, s.sample_sampler, t.seed, m.clip_skip,
                                           say, accelerator.device)
            say(f"prior preservation: {made} class images generated")
        accelerator.wait_for_everyone()
        cfg.dataset.reg_data_dir = db.class_data_dir
        plan, dataset, _, steps_per_epoch, max_steps = prepare_data(cfg, say)

    # ---- what trains ----------------------------------------------------------------------------
    for module in modules:
        module.requires_grad_(False)
    parts.denoiser.requires_grad_(True)
    text_encoders = list(parts.text_encoders.values()) if db.train_text_encoder else []
    for encoder in text_encoders:
        encoder.requires_grad_(True)

    # ---- memory switches ------------------------------------------------------------------------
    dtype = weight_dtype(t.mixed_precision)
    cast_frozen_parts(parts, dtype, t.no_half_vae)  # frozen weights in half precision; trained ones fp32 ...
    store_t5(parts, m.t5xxl_precision, dtype)  # fp8 / int8 T5 for encoding (model.t5xxl_precision)
    if t.full_fp16 or t.full_bf16:  # ... unless everything trains in half precision
        for module in [parts.denoiser, *text_encoders]:
            module.to(dtype)
    attention = set_attention(parts.denoiser, t.xformers, t.sdpa)
    if t.gradient_checkpointing:
        enable_gradient_checkpointing(parts.denoiser, text_encoders)
    if t.cpu_offload_checkpointing:
        offload_checkpoints(parts.denoiser)
    # N blocks' weights (and, once it exists, their optimizer state) live on the CPU between uses; the fused
    # backward pass steps each weight while its block is on the device (library/block_swap.py)
    swapper = make_swapper(family, parts, t.blocks_to_swap, accelerator.device, trained=True)
    compiled = compile_blocks(parts.denoiser, t.torch_compile, t.dynamo_backend)  # after every hook is in place
    say(f"full fine-tune: {_count(parts.denoiser):,} denoiser parameters"
        f"{f' + {sum(_count(e) for e in text_encoders):,} text-encoder' if text_encoders else ''}; "
        f"weights {dtype}, autocast {t.mixed_precision}; attention {attention}"
        + (f"; {compiled} blocks compiled ({t.dynamo_backend})" if compiled else "")
        + (f"; {len(swapper.swapped)} blocks swapped ({swapper.host_ram() / 2**30:.2f} GiB of CPU RAM)"
           if swapper else ""))

    # ---- caches ---------------------------------------------------------------------------------
    with accelerator.main_process_first():  # disk caches: written once, by the main process; read by the rest
        cached_conditioning = cache_outputs(cfg, family, parts, dataset, not text_encoders, accelerator.device,
                                            say)
    move(parts.denoiser, accelerator.device)  # now: the VAE pass of caching did not share the device with it


    # ---- optimizer ------------------------------------------------------------------------------
    o = cfg.optimizer
    groups = [{"params": list(parts.denoiser.parameters()), "lr": o.learning_rate}]
    for index, encoder in enumerate(text_encoders):
        te_lr = db.learning_rate_te2 if index == 1 and db.learning_rate_te2 is not None else db.learning_rate_te
        groups.append({"params": list(encoder.parameters()), "lr": te_lr or o.learning_rate})
    fused = o.fused_backward_pass or bool(o.fused_optimizer_groups)
    if fused:
        if accelerator.num_processes > 1:
            raise SystemExit("fused backward pass steps inside backward, before gradients are averaged across "
                             "processes: train on one GPU, or turn it off")
        optimizer = FusedBackward(o.optimizer_type, groups, o.learning_rate, o.optimizer_args,
                                  chunks=o.fused_optimizer_groups, max_grad_norm=o.max_grad_norm)
        if swapper:
            swapper.optimizer_state = optimizer.state_of  # a swapped weight's state travels with it
        say(f"fused backward pass: {len(optimizer.optimizers)} optimizer steps inside backward"
            + (f"; max_grad_norm {o.max_grad_norm:g} applied per {'parameter' if o.fused_backward_pass else 'group'}"
               if o.max_grad_norm > 0 else ""))
    else:
        optimizer = build_optimizer(o.optimizer_type, groups, o.learning_rate, o.optimizer_args)
    scheduler = build_scheduler(o.lr_scheduler, optimizer, o.lr_warmup_steps, max_steps,
                                o.lr_scheduler_num_cycles, o.lr_scheduler_power, o.lr_scheduler_type,
                                o.lr_scheduler_args)
    loader, sampler, order = make_loader(cfg, plan, dataset)
    trained = [parts.denoiser, *text_encoders]
    if fused:  # modules stay bare (see average_gradients); a fused optimizer steps in backward, unprepared
        loader = accelerator.prepare(loader)
    else:
        optimizer, loader = accelerator.prepare(optimizer, loader)
    result = TrainResult(parts=parts, optimizer=optimizer, ema=ema)
    if cfg.logging.log_with:
        accelerator.init_trackers((cfg.logging.log_prefix or "") + t.output_name)

    # ---- resume, and the training loop -----------------------------------------------------------
    noise_generator = torch.Generator().manual_seed(t.seed)
    params = {f"{i}.{name}": p for i, module in enumerate([parts.denoiser, *text_encoders])
              for name, p in module.named_parameters()}
    checkpoints = Checkpointer(cfg, lambda stem: _save_model(out_dir, stem, family, parts, cfg, ema), params, optimizer,
                         scheduler, {"noise": noise_generator, "order": order}, accelerator.scaler,
                         extra=lambda: {"ema": ema.state_dict()} if ema is not None else {},
                         is_main=accelerator.is_main_process, say=say)
    position = Position()
    if cfg.save.resume:
        position, extra = checkpoints.resume()
        if ema is not None:
            ema.load_state_dict(extra["ema"])
        if position.epoch_order is not None:  # None: the data changed, a new epoch starts
            order.set_state(position.epoch_order)  # replay the interrupted epoch's order ...
        sampler.epoch = position.epoch - 1  # ... as that epoch (captions and augmentations depend on it)
    guard = NonFiniteGuard(t.nan_skip_limit, say, before_backward=fused)  # fused: steps in backward

    def sample(step: int) -> None:
        if sampling and accelerator.is_main_process:
            log.flush()  # the trackers see the steps in order
            paths = render_samples(family, parts, sampling, out_dir / "samples", f"{t.output_name}_step{step:08d}",
                                   accelerator.device)
            log_images(accelerator, paths, step)
            result.samples += paths

    progress = Progress(max_steps, every=cfg.logging.log_every_n_steps, enabled=accelerator.is_main_process)
    log = StepLog(progress, accelerator)  # each step's loss stays on the device until the logging cadence
    result.losses = log.series("loss")
    train_te = bool(text_encoders)
    step, epoch, skip = position.step, position.epoch - (1 if cfg.save.resume else 0), position.batches_done
    batches_done, epoch_order = skip, position.epoch_order
    end = checkpoints.at_the_end(position, max_steps)  # a state saved at the last step: no step is left
    if end:
        epoch = position.epoch
        if end == "finished":
            return result
    if train_te and db.stop_text_encoder_training and step >= db.stop_text_encoder_training:
        train_te = _stop_training(text_encoders, say, step)
    if sampling and sampling.at_first and step == 0:
        sample(0)
    phases.enter("training")
    stop = StopSignal(say).__enter__()
    while step < max_steps:
        epoch += 1
        epoch_order = order.get_state()
        batches_done, batches = skip, accelerator.skip_first_batches(loader, skip) if skip else loader
        skip = 0
        for module in trained:
            module.train()
        for batch in batches:
            batches_done += 1
            with accelerator.accumulate(*trained), accelerator.autocast():
                loss = batch_loss(family, parts, objective, batch, m.clip_skip, noise_generator,
                                  cached_conditioning, train_te, loss_options,
                                  (accelerator.process_index, accelerator.num_processes))
                if guard.loss_ok(loss):
                    accelerator.backward(loss)  # with a fused optimizer, this also steps every parameter
                if accelerator.sync_gradients and not fused:
                    average_gradients([p for g in groups for p in g["params"]], accelerator)
                if accelerator.sync_gradients and guard.step_ok(
                        [p for g in groups for p in g["params"]], 0 if fused else o.max_grad_norm, step,
                        accelerator, optimizer.pop_nonfinite() if fused else False):
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            log.add(loss)
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            step += 1
            if ema is not None and step % db.ema_update_every == 0:
                ema.update_parameters(parts.denoiser)
            if train_te and db.stop_text_encoder_training and step >= db.stop_text_encoder_training:
                train_te = _stop_training(text_encoders, say, step)
            log.step(step, scheduler.get_last_lr()[0])
            here = Position(step, epoch, batches_done, epoch_order)
            checkpoints.after_step(here, max_steps)
            if due(sampling, step) and step < max_steps:
                sample(step)
            if stop.requested:
                checkpoints.save_stopped(here)
                raise SystemExit(EXIT_STOPPED)
            if step >= max_steps:
                break
        checkpoints.after_epoch(Position(step, epoch, batches_done, epoch_order), max_steps)
        if due(sampling, step, epoch_end=epoch) and step < max_steps:
            sample(step)
    stop.__exit__()
    log.flush()
    elapsed = progress.close()
    if fused:
        optimizer.remove_hooks()

    # ---- files ----------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    checkpoints.save(t.output_name, Position(step, epoch, batches_done, epoch_order))
    result.saved = checkpoints.saved
    result.model_path = result.saved[-2 if ema is not None else -1] if result.saved else None
    for module in trained:
        module.eval()
    sample(step)
    accelerator.log(phases.for_trackers(), step=step)  # the peak memory report, into the run's log too
    accelerator.end_training()
    say(f"done: {step} steps in {elapsed:.1f}s, "
        + (f"final loss {result.losses[-1]:.4f}, " if result.losses else "") + f"{peak_memory_text()}; "
        f"model {result.model_path}" + (f"; samples in {out_dir / 'samples'}" if result.samples else ""))
    return result


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _stop_training(text_encoders, say, step: int) -> bool:
    for encoder in text_encoders:
        encoder.requires_grad_(False)
        for p in encoder.parameters():
            p.grad = None
    say(f"step {step}: text encoder frozen (stop_text_encoder_training)")
    return False


def _make_ema(denoiser: torch.nn.Module, db, device):
    """torch's AveragedModel, updated every db.ema_update_every steps with decay ** that: on the CPU (the
    device holds no second copy of the weights; each update copies them over), or with ema_on_device on the
    device (no copies; one more copy of the weights there)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(denoiser, device=device if db.ema_on_device else "cpu",
                         multi_avg_fn=get_ema_multi_avg_fn(db.ema_decay ** db.ema_update_every))


def _save_model(out_dir: Path, name: str, family, parts, cfg: Config, ema) -> list[Path]:
    """The model as one file in the original layout, or as a diffusers folder; with EMA also `name-ema`."""
    saved = [_write(out_dir, name, family, parts, cfg)]
    if ema is not None:
        saved.append(_write(out_dir, name + "-ema", family, dataclasses.replace(parts, denoiser=ema.module), cfg))
    return saved


def _write(out_dir: Path, name: str, family, parts, cfg: Config) -> Path:
    from library.checkpoint import SAVE_DTYPES, save_folder, save_safetensors

    dtype = SAVE_DTYPES[cfg.save.save_precision]
    if cfg.save.save_model_as == "diffusers":
        def write(folder: Path) -> None:
            family.pipeline(parts).save_pretrained(str(folder))
            (folder / "run.json").write_text(json.dumps({"run_id": cfg.run_id}), encoding="utf-8")  # outputs.py
        return save_folder(out_dir / name, write)
    meta = {"modelspec.sai_model_spec": "1.0.0", "modelspec.title": name, "ss_output_name": name,
            "ss_session_id": cfg.run_id,
            **family.file_metadata(parts)}
    return save_safetensors(out_dir / f"{name}.safetensors", family.single_file_state_dict(parts), meta, dtype)


if __name__ == "__main__":
    sys.exit(main())
