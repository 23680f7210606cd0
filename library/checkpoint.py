"""Writing weights: every file and folder is written under a temporary name and renamed into place, so a
kill at any moment leaves the previous good file intact and never a half-written one under the real name."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from library.config_checks import glob_escape

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
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed or interrupted write leaves nothing behind
        raise
    return path


def _for_file(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    tensor = tensor.detach().to("cpu")
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor.contiguous()


def save_folder(path: Path, write) -> Path:
    """`write(tmp_folder)` fills a temporary folder that then replaces `path` (the old one is removed last)."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


# ---------------------------------------------------------------------------------------------
# Resumable training state
# ---------------------------------------------------------------------------------------------

STATE_VERSION = 1
# keys that may differ between the run that saved a state and the run resuming it
RESUME_MAY_CHANGE = {"train.max_train_steps", "train.max_train_epochs", "train.output_dir", "train.output_name",
                     "train.nan_skip_limit", "dataset.max_data_loader_n_workers", "save", "sample", "logging"}


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
                        scaler=None) -> Path:
    """Everything a run needs to go on exactly: trained weights, optimizer, scheduler, grad scaler, every RNG,
    the data position, the config. Written to a temporary folder and renamed, like every save."""
    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in params.items()}, str(tmp / "trained.safetensors"))
        objects = {"optimizer": _optimizer_state(optimizer), "scheduler": scheduler.state_dict(),
                   "rng": _rng_state(), "generators": {k: g.get_state() for k, g in generators.items()},
                   "epoch_order": position.epoch_order, "scaler": scaler.state_dict() if scaler else None,
                   "extra": extra or {}}
        torch.save(objects, tmp / "state.pt")
        info = {"version": STATE_VERSION, "step": position.step, "epoch": position.epoch,
                "batches_done": position.batches_done, "config": config}
        (tmp / "state.json").write_text(json.dumps(info, indent=1, default=str), encoding="utf-8")
    return save_folder(folder, write)


def find_state(resume: str, out_dir: Path) -> Path:
    """`resume` is a state folder, or "latest": the state in out_dir with the most steps."""
    if resume != "latest":
        return Path(resume)
    states = [p for p in out_dir.glob("*-state") if (p / "state.json").is_file()]
    if not states:
        raise FileNotFoundError(f"resume = \"latest\": no saved state (*-state folder) in {out_dir}")
    return max(states, key=lambda p: json.loads((p / "state.json").read_text())["step"])


def check_resumable(folder: Path, config: dict) -> dict:
    """The saved state's info; an error naming every setting that differs in a way resuming cannot honour."""
    info = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    if info.get("version") != STATE_VERSION:
        raise ValueError(f"{folder}: state format {info.get('version')}, this trainer reads {STATE_VERSION}")
    differs = [key for key in sorted(set(_flat(config)) | set(_flat(info["config"])))
               if _flat(config).get(key) != _flat(info["config"]).get(key)
               and key not in RESUME_MAY_CHANGE and key.split(".")[0] not in RESUME_MAY_CHANGE]
    if differs:
        lines = [f"  {k}: saved {_flat(info['config']).get(k)!r}, now {_flat(config).get(k)!r}" for k in differs]
        raise ValueError(f"{folder}: the config differs from the one this state was saved with:\n" + "\n".join(lines))
    return info


def load_training_state(folder: Path, params: dict[str, torch.nn.Parameter], optimizer, scheduler,
                        generators: dict[str, torch.Generator], scaler=None) -> tuple[Position, dict]:
    """Restore what save_training_state wrote (after check_resumable); returns the position and extras."""
    from safetensors.torch import load_file

    info = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    weights = load_file(str(folder / "trained.safetensors"))
    if set(weights) != set(params):
        raise ValueError(f"{folder}: trained weights do not match this run ({sorted(set(weights) ^ set(params))[:3]})")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(weights[name])
    objects = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    _load_optimizer_state(optimizer, objects["optimizer"])
    scheduler.load_state_dict(objects["scheduler"])
    for name, generator in generators.items():
        generator.set_state(objects["generators"][name])
    _set_rng_state(objects["rng"])
    if scaler is not None and objects["scaler"]:
        scaler.load_state_dict(objects["scaler"])
    position = Position(info["step"], info["epoch"], info["batches_done"], objects["epoch_order"])
    return position, objects["extra"]


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
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss],
            "python": json.dumps(random.getstate())}


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))
    version, internal, gauss_next = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss_next))


def _flat(config: dict) -> dict:
    return {f"{section}.{key}": value for section, values in config.items() for key, value in values.items()}


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
                 scaler=None, extra=None, is_main: bool = True, say=print):
        self.cfg, self.save_weights, self.say, self.is_main = cfg, save_weights, say, is_main
        self.out_dir, self.name = Path(cfg.train.output_dir), cfg.train.output_name
        self.state = dict(params=params, optimizer=optimizer, scheduler=scheduler, generators=generators,
                          scaler=scaler)
        self.extra = extra or (lambda: {})  # callable: recipe-specific state (EMA weights, ...)
        self.saved: list[Path] = []

    def save(self, stem: str, position: Position, keep: int | None = None, pattern: str | None = None) -> None:
        """Weights as `stem` (+ `stem-state` with save_state); then keep only the newest `keep` matching."""
        if not self.is_main:
            return
        try:
            self.saved += self.save_weights(stem)
            if self.cfg.save.save_state:
                self.save_state(stem, position)
        except OSError as e:
            raise OSError(f"cannot write {self.out_dir / stem}: {e.strerror or e}. Earlier files are untouched "
                          f"(every save is written to a temporary name first).") from None
        if keep and pattern:  # the weights (a file, or a diffusers folder) and the states, each kept `keep`
            for suffix in (".safetensors", "", "-state"):
                remove_old(self.out_dir, pattern + suffix, keep, self.say)

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
        self.save_state(self._step_stem(here.step), here)

    def _step_stem(self, step: int) -> str:
        return f"{self.name}-step{step:08d}"

    def save_state(self, stem: str, position: Position) -> Path:
        folder = save_training_state(self.out_dir / f"{stem}-state", position, config=self.cfg.to_toml_dict(),
                                     extra=self.extra(), **self.state)
        self.say(f"saved resumable state {folder}")
        return folder

    def resume(self) -> tuple[Position, dict]:
        folder = find_state(self.cfg.save.resume, self.out_dir)
        check_resumable(folder, self.cfg.to_toml_dict())
        position, extra = load_training_state(folder, **self.state)
        self.say(f"resumed from {folder}: step {position.step}, epoch {position.epoch}, "
                 f"{position.batches_done} batches into it")
        return position, extra


def resumed_seed(cfg) -> int | None:
    """The seed of the run being resumed (a run whose seed was drawn at random keeps it when resumed)."""
    if not cfg.save.resume:
        return None
    folder = find_state(cfg.save.resume, Path(cfg.train.output_dir))
    return json.loads((folder / "state.json").read_text(encoding="utf-8"))["config"]["train"].get("seed")
