"""What both recipes' training loops do around their steps, once: where a run starts (a resumed state's
position, the interrupted epoch's order replayed), and after each optimizer step and each epoch the progress
line, the logged values, checkpoints, samples and the stop signal (Ctrl+C / SIGTERM: save, exit 5). The loops
themselves stay in the recipes, visible."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from library.checkpoint import Position


def resume_position(cfg, checkpoints, order, sampler, steps_per_epoch: int) -> tuple[Position, dict]:
    """The position a run starts from and the extra state its checkpoint saved ({} without save.resume: the
    start, or sd-scripts' skip_until_initial_step position). A resumed run replays the interrupted epoch's order
    as that epoch (captions and augmentations depend on it); when the data changed (no order saved), a new epoch
    starts."""
    from library.training import initial_position

    if not cfg.save.resume:
        return initial_position(cfg, sampler, order, steps_per_epoch), {}
    position, extra = checkpoints.resume()
    if position.epoch_order is not None:
        order.set_state(position.epoch_order)
    sampler.epoch = position.epoch - 1
    return position, extra


@dataclass
class Bookkeeping:
    """After a step or an epoch: logs (library.progress.StepLog: the step's values stay on the device until the
    logging cadence), checkpoints, samples (with `also` in between, e.g. the validation loss), and the stop
    signal. `sample(step)` renders the prompts (main process); the log is read before it, so the trackers see
    the steps in order.

    The loop runs inside `with books:`, which holds the stop signal (library.guards.StopSignal: SIGTERM / SIGINT
    ask for a save and exit 75) and gives the process its own handlers back when the loop ends, raises or
    exits."""
    accelerator: object
    checkpoints: object  # library.checkpoint.Checkpointer
    log: object  # library.progress.StepLog
    sampling: object  # library.sampling settings, or None
    sample: Callable[[int], None]
    max_steps: int
    say: Callable[[str], None] = print
    stop: object = None  # library.guards.StopSignal, while the loop runs

    def __enter__(self) -> "Bookkeeping":
        from library.guards import StopSignal

        self.stop = StopSignal(self.say).__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.__exit__(*exc)

    def at_start(self, step: int) -> None:
        if self.sampling and self.sampling.at_first and step == 0:
            self.sample(0)

    def after_step(self, here: Position, lr: float, also: Callable[[int], None] | None = None, **values):
        """Step here.step is done (its micro-batch losses added to the log); `values`: more device scalars."""
        from library.guards import EXIT_STOPPED
        from library.sampling import due

        self.log.step(here.step, lr, **values)
        self.checkpoints.after_step(here, self.max_steps)
        if due(self.sampling, here.step) and here.step < self.max_steps:
            self.log.flush()
            self.sample(here.step)
        if also is not None:
            also(here.step)
        if self.stop.requested:
            self.log.flush()
            self.checkpoints.save_stopped(here)
            raise SystemExit(EXIT_STOPPED)

    def after_epoch(self, here: Position, also: Callable[[int], None] | None = None) -> None:
        from library.sampling import due

        self.checkpoints.after_epoch(here, self.max_steps)
        if also is not None:
            also(here.step)
        if due(self.sampling, here.step, epoch_end=here.epoch) and here.step < self.max_steps:
            self.log.flush()
            self.sample(here.step)


def sample_renderer(family, parts, sampling, accelerator, folder, output_name: str, into: list):
    """sample(step): the prompts rendered on the main process into `folder`, logged to the trackers, the
    paths appended to `into`; nothing without sample prompts. Rendered in the run's precision (its autocast),
    as training computes: an fp8 base's layers compute in that dtype, whatever the sampler's latents are. With
    sharded weights (FSDP2) every process renders (each block's forward gathers its weights from all of them);
    the others' images go unsaved."""
    import tempfile

    from library.engines import autocast, is_sharded
    from library.sampling import log_images, render_samples

    def sample(step: int) -> None:
        tag = f"{output_name}_step{step:08d}"
        if sampling and accelerator.is_main_process:
            with autocast(accelerator):  # accelerator.autocast(); DeepSpeed's: as its engine autocasts
                paths = render_samples(family, parts, sampling, folder, tag, accelerator.device)
            log_images(accelerator, paths, step)
            into.extend(paths)
        elif sampling and is_sharded(accelerator):
            with tempfile.TemporaryDirectory() as elsewhere, autocast(accelerator):
                render_samples(family, parts, sampling, Path(elsewhere), tag, accelerator.device)

    return sample
