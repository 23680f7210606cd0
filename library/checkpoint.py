"""Writing weights: every file and folder is written under a temporary name and renamed into place, so a
kill at any moment leaves the previous good file intact and never a half-written one under the real name."""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from library.block_swap import settle_all
from library.config import ConfigError
from library.config_checks import glob_escape
from library.engines import launched_engine, launched_processes
from library.phases import during
from library.saved_state import (RESUME_MAY_CHANGE, SHARDED, STATE_VERSION, read_state_info, check_resumable,  # noqa: F401
                                 find_state, recover_folder)

SAVE_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                     dtype: torch.dtype | None = None) -> Path:
    """Tensors (moved to the CPU, floats cast to `dtype` if given) to `path`, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: _for_file(v, dtype) for k, v in tensors.items()}
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        usual_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed or interrupted write leaves nothing behind
        raise
    return path


def usual_permissions(path: Path) -> None:
    """safetensors writes files 0600; a saved file gets what the user's umask gives any new file (0644 with
    the usual 022), so a UI running as another user (a ComfyUI container) can read it."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [path, *(Path(path).rglob("*") if Path(path).is_dir() else [])]:
        os.chmod(p, (0o777 if Path(p).is_dir() else 0o666) & ~umask)


def _for_file(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    tensor = tensor.detach().to("cpu")
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor.contiguous()


def save_folder(path: Path, write) -> Path:
    """`write(tmp_folder)` fills a temporary folder that then replaces `path` (the old one is removed last)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    recover_folder(path)
    try:
        write(tmp)
        usual_permissions(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _into_place(tmp, path)


def _into_place(tmp: Path, path: Path) -> Path:
    """The written `tmp` becomes `path`; a previous `path` is kept as path.old until then (recover_folder)."""
    old = path.with_name(path.name + ".old")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def save_folder_together(path: Path, accelerator, write) -> Path:
    """save_folder for a sharded state: every process writes its shards of the model and optimizer into the
    temporary folder (accelerator.save_state, into SHARDED), the main process `write(tmp)`s the rest, and once
    all have written the main process renames it into place. Every process calls this."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        recover_folder(path)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / SHARDED))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write(tmp)
        usual_permissions(tmp)
        _into_place(tmp, path)
    accelerator.wait_for_everyone()
    return path


# ---------------------------------------------------------------------------------------------
# Resumable training state
# ---------------------------------------------------------------------------------------------

@dataclass
class Position:
    """Where a run is: after `step` optimizer steps, `batches_done` batches into epoch `epoch`, whose batch
    order was drawn from the order generator in state `epoch_order`."""
    step: int = 0
    epoch: int = 0
    batches_done: int = 0
    epoch_order: torch.Tensor | None = None


def save_training_state(folder: Path, position: Position, params: dict[str, torch.nn.Parameter], optimizer,
                        scheduler, generators: dict[str, torch.Generator], config: dict, extra: dict | None = None,
                        scaler=None, run_id: str = "", data: dict | None = None, sharded=None) -> Path:
    """Everything a run needs to go on exactly: trained weights, optimizer, scheduler, grad scaler, every RNG,
    the data position, the config. Written to a temporary folder and renamed, like every save. sharded: the
    accelerator of an FSDP2 run, whose processes each write their shards of the weights and optimizer state
    (and their RNGs) through accelerator.save_state (every process calls this then)."""
    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True, exist_ok=sharded is not None)
        if sharded is None:
            save_file({k: v.detach().cpu().contiguous() for k, v in params.items()}, str(tmp / "trained.safetensors"))
        objects = {"optimizer": None if sharded else _optimizer_state(optimizer), "scheduler": scheduler.state_dict(),
                   "rng": _rng_state(), "generators": {k: g.get_state() for k, g in generators.items()},
                   "epoch_order": position.epoch_order, "scaler": scaler.state_dict() if scaler else None,
                   "extra": extra or {}}
        torch.save(objects, tmp / "state.pt")
        info = {"version": STATE_VERSION, "step": position.step, "epoch": position.epoch,
                "batches_done": position.batches_done, "processes": launched_processes(), "config": config,
                "run_id": run_id, "data": data, **({"sharded": launched_engine()} if sharded else {})}
        (tmp / "state.json").write_text(json.dumps(info, indent=1, default=str), encoding="utf-8")
    return save_folder(folder, write) if sharded is None else save_folder_together(folder, sharded, write)


def load_training_state(folder: Path, params: dict[str, torch.nn.Parameter], optimizer, scheduler,
                        generators: dict[str, torch.Generator], scaler=None, sharded=None,
                        scratch: Path | None = None) -> tuple[Position, dict]:
    """Restore what save_training_state wrote (after check_resumable); returns the position and extras.
    sharded: the accelerator of an FSDP2 / DeepSpeed run (every process loads its shards and its RNGs; a
    DeepSpeed state of another number of processes is resharded in `scratch`, this run's output folder)."""
    info = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    if sharded is None:
        _load_weights(folder, params)
    objects = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    if sharded is None:
        _load_optimizer_state(optimizer, objects["optimizer"])
    scheduler.load_state_dict(objects["scheduler"])
    for name, generator in generators.items():
        generator.set_state(objects["generators"][name])
    _set_rng_state(objects["rng"])
    if scaler is not None and objects["scaler"]:
        scaler.load_state_dict(objects["scaler"])
    if info.get("sharded") == "deepspeed":  # every process: its partitions and its RNGs (after the main one's)
        from library.deepspeed_states import load_deepspeed_state

        load_deepspeed_state(sharded, folder / SHARDED, info.get("processes", 1), scratch or folder.parent)
    elif sharded is not None:  # FSDP2: torch.distributed.checkpoint reshards for any number of processes
        sharded.load_state(str(folder / SHARDED))
    position = Position(info["step"], info["epoch"], info["batches_done"], objects["epoch_order"])
    return position, objects["extra"]


def _load_weights(folder: Path, params: dict[str, torch.nn.Parameter]) -> None:
    from safetensors.torch import load_file

    weights = load_file(str(folder / "trained.safetensors"))
    if set(weights) != set(params):
        raise ConfigError(f"'save.resume': {folder} holds the trained weights of another model or adapter "
                          f"({len(weights)} tensors, this run trains {len(params)}; e.g. "
                          f"{sorted(set(weights) ^ set(params))[:2]})")
    wrong = [k for k in params if weights[k].shape != params[k].shape]
    if wrong:
        raise ConfigError(f"'save.resume': {folder} holds weights of other shapes ({wrong[0]}: saved "
                          f"{tuple(weights[wrong[0]].shape)}, this run {tuple(params[wrong[0]].shape)})")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(weights[name])


def _optimizer_state(optimizer):
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    if hasattr(inner, "optimizers"):  # FusedBackward: one optimizer per chunk
        return [o.state_dict() for o in inner.optimizers]
    return inner.state_dict()


def _load_optimizer_state(optimizer, state) -> None:
    inner = getattr(optimizer, "optimizer", optimizer)
    if hasattr(inner, "optimizers"):
        for o, s in zip(inner.optimizers, state):
            o.load_state_dict(s)
    else:
        inner.load_state_dict(state)


def _rng_state() -> dict:
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": [torch.cuda.get_rng_state(torch.cuda.current_device())] if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss],
            "python": json.dumps(random.getstate())}


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    _set_device_rng_state(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))
    version, internal, gauss_next = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss_next))


def _set_device_rng_state(saved: list) -> None:
    """This process' own GPU RNG, from the state the saving process wrote of its GPU (states written before:
    one per GPU of that machine; this process takes its own index's, or the first). Every process sets only its
    own device, so a machine with fewer visible GPUs than the one that saved resumes (no IndexError)."""
    if not saved or not torch.cuda.is_available():
        return
    index = torch.cuda.current_device()
    torch.cuda.set_rng_state(saved[index] if index < len(saved) else saved[0], index)


def remove_old(out_dir: Path, pattern: str, keep: int, say=print) -> list[Path]:
    """save_last_n_*: delete all but the `keep` newest files/folders matching `pattern` (by name, which
    carries the zero-padded step or epoch). The newest is never removed."""
    found = sorted(p for p in out_dir.glob(pattern) if not p.name.endswith((".tmp", ".old")))
    doomed = found[:-keep] if keep > 0 else []
    for path in doomed:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        say(f"removed old {path.name} (keeping the last {keep})")
    return doomed


class Checkpointer:
    """The files of a run: weights at each save (written by the recipe's `save_weights(stem)`), a resumable
    state beside them when asked (and always when a signal stops the run), old saves removed as
    save_last_n_* says, and resuming. Only the main process writes."""

    def __init__(self, cfg, save_weights, params: dict, optimizer, scheduler, generators: dict,
                 scaler=None, extra=None, is_main: bool = True, say=print, sharded=None):
        self.cfg, self.save_weights, self.say, self.is_main = cfg, save_weights, say, is_main
        self.sharded = sharded  # FSDP2's accelerator: every process takes part in each save (see save_training_state)
        self.out_dir, self.name = Path(cfg.train.output_dir), cfg.train.output_name
        self.state = dict(params=params, optimizer=optimizer, scheduler=scheduler, generators=generators,
                          scaler=scaler)
        self.extra = extra or (lambda: {})  # callable: recipe-specific state (EMA weights, ...)
        self.saved: list[Path] = []

    @during("saving")
    def save(self, stem: str, position: Position, keep: int | None = None, pattern: str | None = None) -> None:
        """Weights as `stem` (+ `stem-state` with save_state); then keep only the newest `keep` matching."""
        if not self.is_main and self.sharded is None:
            return
        settle_all()  # block swap's write-backs in flight: the host copies of the weights current first
        try:
            self.saved += self.save_weights(stem)
            if self.cfg.save.save_state:
                self.save_state(stem, position)
        except (OSError, SafetensorError) as e:  # safetensors reports a failed write as its own error
            raise ConfigError(self._cannot_write(stem, e)) from None
        if keep and pattern and self.is_main:  # the weights (a file, or a diffusers folder) and the states, each kept `keep`
            for suffix in (".safetensors", "", "-state"):
                remove_old(self.out_dir, pattern + suffix, keep, self.say)

    def _cannot_write(self, stem: str, error: Exception) -> str:
        """One line for a failed save (disk full, a file-size limit, permissions): which file, about how much
        it needed, how much is free, and that earlier files are intact."""
        weights = sum(p.numel() * p.element_size() for p in self.state["params"].values())
        needed = weights * (3 if self.cfg.save.save_state else 1)  # a state adds the optimizer's moments
        try:
            free = f", {shutil.disk_usage(self.out_dir).free / 2**20:,.0f} MB free"
        except OSError:
            free = ""
        code = error.errno if isinstance(error, OSError) else re.search(r"os error (\d+)", str(error))
        reason = os.strerror(int(code if isinstance(code, int) else code[1])) if code else str(error)
        return (f"'train.output_dir': cannot write {self.out_dir / stem}: {reason} (this save "
                f"needs about {needed / 2**20:,.1f} MB{free}). Earlier files are intact: every save is written "
                f"to a temporary name first")

    def after_step(self, here: Position, max_steps: int) -> None:
        """save_every_n_steps: name-step00000500 (the final save, at max_steps, is the recipe's), keeping the
        newest save_last_n_steps."""
        every = self.cfg.save.save_every_n_steps
        if every and here.step % every == 0 and here.step < max_steps:
            self.save(self._step_stem(here.step), here, self.cfg.save.save_last_n_steps,
                      f"{glob_escape(self.name)}-step????????")

    def after_epoch(self, here: Position, max_steps: int) -> None:
        """save_every_n_epochs: name-000004, keeping the newest save_last_n_epochs."""
        every = self.cfg.save.save_every_n_epochs
        if every and here.epoch % every == 0 and here.step < max_steps:
            self.save(f"{self.name}-{here.epoch:06d}", here, self.cfg.save.save_last_n_epochs,
                      f"{glob_escape(self.name)}-{'[0-9]' * 6}")

    def save_stopped(self, here: Position) -> None:
        """A signal stopped the run: a resumable state of this step."""
        if self.is_main or self.sharded is not None:
            self.save_state(self._step_stem(here.step), here)

    def _step_stem(self, step: int) -> str:
        return f"{self.name}-step{step:08d}"

    @during("saving")
    def save_state(self, stem: str, position: Position) -> Path:
        settle_all()  # the swapped weights' and optimizer state's host copies current (library/block_swap.py)
        folder = save_training_state(self.out_dir / f"{stem}-state", position, config=self.cfg.to_toml_dict(),
                                     extra=self.extra(), run_id=self.cfg.run_id, data=self.cfg.data_fingerprint,
                                     sharded=self.sharded, **self.state)
        self.say(f"saved resumable state {folder}")
        return folder

    def at_the_end(self, position: Position, max_steps: int) -> str | None:
        """A resumed state saved at the last step: "finished" when the final weights exist (nothing to do), else
        "final files" (only they remain to be written); None while steps remain. Says which."""
        if not self.cfg.save.resume or position.step < max_steps:
            return None
        if (self.out_dir / f"{self.name}.safetensors").is_file() or (self.out_dir / self.name).is_dir():
            self.say(f"this run finished at step {position.step} (max_train_steps {max_steps}); its final "
                     f"weights are in {self.out_dir}: nothing to do")
            return "finished"
        self.say(f"the state is at step {position.step} of {max_steps}: no step is left; writing the final files")
        return "final files"

    def resume(self) -> tuple[Position, dict]:
        folder = find_state(self.cfg.save.resume, self.out_dir, self.say)
        info = check_resumable(folder, self.cfg.to_toml_dict())
        position, extra = load_training_state(folder, sharded=self.sharded, scratch=self.out_dir, **self.state)
        position = self._reshared(position, info.get("processes", 1), launched_processes())
        if (self.cfg.data_fingerprint or {}).get("changed"):  # resume_with_changed_data: a new epoch from here
            position = Position(position.step, position.epoch + 1, 0, None)
        self.say(f"resumed from {folder}: step {position.step}, epoch {position.epoch}, "
                 f"{position.batches_done} batches into it")
        return position, extra


    def _reshared(self, position: Position, saved: int, now: int) -> Position:
        """A state saved by `saved` processes, resumed by `now`: batches_done counts one process' batches, and
        each process takes every processes-th batch of the epoch, so the epoch goes on at the same global batch
        (rounded down to a multiple of `now`: at most now - 1 batches are seen again)."""
        if saved == now:
            return position
        done = position.batches_done * saved
        self.say(f"the state was saved by {_processes(saved)}, this run has {now}: the epoch goes on after "
                 f"{done // now * now} of its batches" + (f" ({done % now} seen again)" if done % now else ""))
        return Position(position.step, position.epoch, done // now, position.epoch_order)


def _processes(count: int) -> str:
    return "1 process" if count == 1 else f"{count} processes"


def resumed_seed(cfg) -> int | None:
    """The seed of the run being resumed (a run whose seed was drawn at random keeps it when resumed)."""
    if not cfg.save.resume:
        return None
    folder = find_state(cfg.save.resume, Path(cfg.train.output_dir))
    return read_state_info(folder)["config"].get("train", {}).get("seed")
