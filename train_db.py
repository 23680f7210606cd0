"""DreamBooth / full fine-tuning of the denoiser (and optionally the text encoder), with prior preservation.

    accelerate launch train_db.py --config my_dreambooth.toml [--set section.key=value ...]

Reads top to bottom like train_network.py: config -> data -> model -> class images -> what trains ->
memory switches -> caches -> optimizer (plain or fused into backward) -> the training loop -> files.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from library import cli
from library.config import Config


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
    return cli.recipe_main(argv, __doc__, "db", train)


def train(cfg: Config, planned=None) -> TrainResult:
    """The run; `planned` is the data plan main() made before the heavy imports below (made here if None)."""
    import torch

    from library import phases
    from library.checkpoint import Checkpointer, Position
    from library.engines import full_weights, is_fsdp2, is_sharded, loading_whole
    from library.model_files import check_model_files, load_model
    from library.block_swap import settle_all
    from library.guards import NonFiniteGuard
    from library.loop import Bookkeeping, resume_position, sample_renderer
    from library.memory import peak_memory_text
    from library.objectives import configure
    from library.optim import schedule_of
    from library.prior import ensure_class_images
    from library.progress import Progress, StepLog
    from library.run import (OptimizerSettings, Switches, apply_switches, cache_and_place, make_optimizer, prepare,
                             start, start_trackers, train_whole, whole_model_groups)
    from library.sampling import settings_from_config
    from library.sd_flat import text_encoder_of_family
    from library.sharded_ema import ShardedEMA
    from library.training import batch_loss, make_loader, prepare_data

    t, db, out_dir = cfg.train, cfg.dreambooth, Path(cfg.train.output_dir)
    found = check_model_files(cfg)  # the model and adapter files, from their headers: before anything is written
    te_note = text_encoder_of_family(cfg, found and found.name)  # sd-scripts input: its script's text encoders
    run = start(cfg, "db")  # seed, refusals, the accelerator, the output folder claimed
    accelerator, say = run.accelerator, run.say

    # ---- data: every image and caption is checked before any model loads ----------------------
    plan, dataset, (width, height), steps_per_epoch, max_steps = prepare_data(cfg, say, planned)
    sampling = settings_from_config(cfg, width, height)  # the prompt file, read and checked now

    # ---- model, then class images from the untouched base model ----------------------------------
    m = cfg.model
    with loading_whole(accelerator):  # ZeRO-3 partitions the denoiser when prepared, nothing at load time
        family, parts = load_model(cfg)
    te_note = te_note or text_encoder_of_family(cfg, family.name)  # a family only loading could tell
    if te_note:
        say(te_note)
    objective, loss_options = configure(family.objective(parts), cfg.loss)
    ema = (_make_ema(parts.denoiser, db, accelerator.device)  # a CPU copy, made before .to(device)
           if db.use_ema and not is_fsdp2(accelerator) else None)  # ZeRO-1/2: whole weights on each process
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
    text_encoders = train_whole(parts, db.train_text_encoder)
    trained = [parts.denoiser, *text_encoders]

    # ---- memory switches ------------------------------------------------------------------------
    # frozen weights in half precision, trained ones fp32 unless full_fp16 / full_bf16; with block swap N blocks'
    # weights (and their optimizer state) live on the CPU between uses, and the fused backward pass steps each
    # weight while its block is on the device (library/block_swap.py)
    trained_params = [p for module in trained for p in module.parameters()]
    placed = apply_switches(family, parts, Switches.from_config(cfg), trained_params, text_encoders,
                            accelerator.device, whole=True)
    swapper = placed.swapper
    say(f"full fine-tune: {_count(parts.denoiser):,} denoiser parameters"
        f"{f' + {sum(_count(e) for e in text_encoders):,} text-encoder' if text_encoders else ''}; "
        f"weights {placed.dtype}, autocast {t.mixed_precision}; attention {placed.attention}"
        + (f"; {placed.compiled} blocks compiled ({t.dynamo_backend})" if placed.compiled else "")
        + (f"; {len(swapper.swapped)} blocks swapped ({swapper.host_ram() / 2**30:.2f} GiB of CPU RAM)"
           if swapper else ""))

    # ---- caches ---------------------------------------------------------------------------------
    with accelerator.main_process_first():  # disk caches: written once, by the main process; read by the rest
        cached_conditioning = cache_and_place(cfg, family, parts, dataset, not text_encoders, accelerator.device,
                                              say)

    # ---- optimizer ------------------------------------------------------------------------------
    o, chosen = cfg.optimizer, OptimizerSettings.from_config(cfg)
    groups = whole_model_groups(parts.denoiser, text_encoders, o.learning_rate, db.learning_rate_te,
                                db.learning_rate_te2)
    optimizer, _ = make_optimizer(chosen, groups, swapper, accelerator.num_processes)
    fused = chosen.fused
    if fused:
        say(f"fused backward pass: {len(optimizer.optimizers)} optimizer steps inside backward"
            + (f"; max_grad_norm {o.max_grad_norm:g} applied per {'parameter' if o.fused_backward_pass else 'group'}"
               if o.max_grad_norm > 0 else ""))
    scheduler = schedule_of(o, optimizer, max_steps)
    loader, sampler, order = make_loader(cfg, plan, dataset)
    engine, optimizer, loader = prepare(accelerator, parts, trained, optimizer, loader, fused, t.full_fp16)
    if is_sharded(accelerator):  # FSDP2: the optimizer now steps the shards (what is clipped and checked)
        groups = optimizer.param_groups
        if db.use_ema and is_fsdp2(accelerator):  # each process averages its shards (library/sharded_ema.py)
            ema = ShardedEMA(parts.denoiser, db.ema_decay ** db.ema_update_every,
                             db.ema_on_device).with_states_of(accelerator)
    result = TrainResult(parts=parts, optimizer=optimizer, ema=ema)
    start_trackers(accelerator, cfg)

    # ---- resume, and the training loop -----------------------------------------------------------
    noise_generator = torch.Generator().manual_seed(t.seed)
    params = {f"{i}.{name}": p for i, module in enumerate([parts.denoiser, *text_encoders])
              for name, p in module.named_parameters()}
    def save_weights(stem: str) -> list[Path]:
        with full_weights(accelerator, parts) as whole:  # FSDP2: gathered on the main process, None elsewhere
            averaged = _averaged_denoiser(ema, accelerator, parts.denoiser)
            return _save_model(out_dir, stem, family, whole, cfg, averaged) if whole is not None else []

    checkpoints = Checkpointer(cfg, save_weights, params, optimizer,
                         scheduler, {"noise": noise_generator, "order": order}, accelerator.scaler,
                         extra=lambda: {"ema": ema.state_dict()} if ema is not None else {},
                         is_main=accelerator.is_main_process, say=say,
                         sharded=accelerator if is_sharded(accelerator) else None)
    position, extra = resume_position(cfg, checkpoints, order, sampler, steps_per_epoch)
    if ema is not None and cfg.save.resume:
        ema.load_state_dict(extra["ema"])
    guard = NonFiniteGuard(t.nan_skip_limit, say, before_backward=fused)  # fused: steps in backward
    clip = 0 if fused or engine.steps_in_backward else o.max_grad_norm  # those clip inside backward

    sample = sample_renderer(family, parts, sampling, accelerator, out_dir / "samples", t.output_name,
                             result.samples)
    progress = Progress(max_steps, every=cfg.logging.log_every_n_steps, enabled=accelerator.is_main_process)
    log = StepLog(progress, accelerator)  # each step's loss stays on the device until the logging cadence
    result.losses = log.series("loss")
    books = Bookkeeping(accelerator, checkpoints, log, sampling, sample, max_steps, say)
    train_te = bool(text_encoders)
    step, epoch, skip = position.step, position.epoch - (1 if position.epoch else 0), position.batches_done
    batches_done, epoch_order = skip, position.epoch_order
    end = checkpoints.at_the_end(position, max_steps)  # a state saved at the last step: no step is left
    if end:
        epoch = position.epoch
        if end == "finished":
            return result
    if train_te and db.stop_text_encoder_training and step >= db.stop_text_encoder_training:
        train_te = _stop_training(text_encoders, say, step)
    books.at_start(step)
    phases.enter("training")
    with books:  # SIGTERM / SIGINT: save and exit 75; the handlers restored after
        while step < max_steps:
            epoch += 1
            epoch_order = order.get_state()
            batches_done, batches = skip, accelerator.skip_first_batches(loader, skip) if skip else loader
            skip = 0
            for module in trained:
                module.train()
            for batch in batches:
                batches_done += 1
                with accelerator.accumulate(*engine.engine_modules), accelerator.autocast():
                    loss = batch_loss(family, engine.step_parts, objective, batch, m.clip_skip, noise_generator,
                                      cached_conditioning, train_te, loss_options,
                                      (accelerator.process_index, accelerator.num_processes))
                    if guard.loss_ok(loss, accelerator.num_processes):
                        accelerator.backward(loss)  # with a fused optimizer, this also steps every parameter
                    if accelerator.sync_gradients and guard.step_ok(
                            [p for g in groups for p in g["params"]], clip, step, accelerator, _known_bad(optimizer,
                                                                                                 fused, engine)):
                        optimizer.step()  # DeepSpeed: stepped (or skipped) inside accelerator.backward already
                    optimizer.zero_grad(set_to_none=True)
                log.add(loss)
                if not accelerator.sync_gradients:
                    continue
                scheduler.step()
                step += 1
                if ema is not None and step % db.ema_update_every == 0:
                    settle_all()  # block swap's write-backs done: the host copies current (library/block_swap.py)
                    ema.update_parameters(parts.denoiser)
                if train_te and db.stop_text_encoder_training and step >= db.stop_text_encoder_training:
                    train_te = _stop_training(text_encoders, say, step)
                books.after_step(Position(step, epoch, batches_done, epoch_order), scheduler.get_last_lr()[0])
                if step >= max_steps:
                    break
            books.after_epoch(Position(step, epoch, batches_done, epoch_order))
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


def _known_bad(optimizer, fused: bool, engine):
    """Whether the step's gradients are already known not to be finite: the fused backward pass checks its own;
    DeepSpeed skipped its step inside backward on them (ZeRO-1/2; ZeRO-3 checks only under fp16)."""
    if fused:
        return optimizer.pop_nonfinite()
    return bool(optimizer.step_was_skipped) if engine.steps_in_backward else False


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


def _averaged_denoiser(ema, accelerator, denoiser):
    """The EMA's denoiser as saving reads it: AveragedModel's copy; with sharded weights (FSDP2) an unsharded
    copy gathered on the main process (None on the others, every process taking part). None without EMA."""
    from library.sharded_ema import ShardedEMA

    if ema is None:
        return None
    return ema.averaged_copy(accelerator, denoiser) if isinstance(ema, ShardedEMA) else ema.module


def _save_model(out_dir: Path, name: str, family, parts, cfg: Config, averaged=None) -> list[Path]:
    """The model as one file in the original layout, or as a diffusers folder; with an EMA's `averaged`
    denoiser also `name-ema`."""
    saved = [_write(out_dir, name, family, parts, cfg)]
    if averaged is not None:
        saved.append(_write(out_dir, name + "-ema", family, dataclasses.replace(parts, denoiser=averaged), cfg))
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
