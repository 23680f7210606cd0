"""The files a run writes in output_dir, which of them an earlier run left there, and the lock that keeps two
runs out of one folder. Nothing the user had is overwritten: a file this run would write that another run
left is refused before any model loads (unless save.overwrite), and a resumed run may replace only what
the run it continues wrote (its run id is in each file: ss_session_id in weights, run_id in states and in the
resolved config). Imports no torch: the config check runs this within a second of starting.
"""
from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

from library.config import ConfigError
from library.saved_state import find_state, read_state_info, safetensors_problem

LOCK_NAME = ".latent-trainer.lock"
RUN_ID_LINE = re.compile(r"^# run_id = ([0-9a-f]+)$", re.M)


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def run_file_pattern(name: str) -> re.Pattern:
    """Names this run writes: name, name-ema, name-step00000500, name-000004 (+ -ema), each as a .safetensors
    file, a diffusers folder or a -state folder; and name-config.toml. Not name-v2.safetensors."""
    stem = re.escape(name) + r"(-step\d{8}|-\d{6})?(-ema)?"
    return re.compile(rf"^(?:{stem}(?:\.safetensors|-state)?|{re.escape(name)}-config\.toml)$")


def run_files(out_dir: Path, name: str) -> list[Path]:
    """The files and folders in out_dir that this run would write (or replace), as they exist now."""
    if not out_dir.is_dir():
        return []
    pattern = run_file_pattern(name)
    found = [p for p in out_dir.iterdir() if pattern.match(p.name)]
    return sorted(p for p in found if p.suffix in (".safetensors", ".toml") or p.is_dir())


def run_id_of(path: Path) -> str | None:
    """The run that wrote `path`: ss_session_id of a .safetensors header, run_id of a state folder, the
    run_id line of a resolved config, run.json in a diffusers folder; None if it carries none."""
    try:
        if path.suffix == ".safetensors":
            if safetensors_problem(path):
                return None
            with open(path, "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            return header.get("__metadata__", {}).get("ss_session_id")
        if path.name.endswith("-state"):
            return read_state_info(path).get("run_id")
        if path.suffix == ".toml":
            found = RUN_ID_LINE.search(path.read_text(encoding="utf-8", errors="replace"))
            return found.group(1) if found else None
        if path.is_dir() and (path / "run.json").is_file():
            return json.loads((path / "run.json").read_text(encoding="utf-8")).get("run_id")
    except (OSError, ValueError, ConfigError):
        return None
    return None


def check_outputs(cfg) -> str:
    """Refuse (ConfigError) an output_dir that cannot be written and any file this run would replace that
    another run left; return this run's id (the resumed run's, or a new one)."""
    out, name = Path(cfg.train.output_dir), cfg.train.output_name
    _check_writable(out, cfg.source)
    run_id, done = new_run_id(), (-1, -1)
    if cfg.save.resume:
        info = read_state_info(find_state(cfg.save.resume, out, say=lambda _: None))
        run_id, done = info.get("run_id") or run_id, (info["step"], info["epoch"])
    if cfg.save.overwrite:
        return run_id
    for path in run_files(out, name):
        if _saved_before(path, name, *done):  # a resumed run does not write these again
            continue
        if not cfg.save.resume:
            raise ConfigError(f"{cfg.source}: {path} exists from an earlier run and would be overwritten; choose "
                              f"another 'train.output_name' or output_dir, or set 'save.overwrite' = true")
        if run_id_of(path) != run_id:
            raise ConfigError(f"{cfg.source}: {path} was written by another run than the one 'save.resume' "
                              f"continues, and would be overwritten; move it, choose another "
                              f"'train.output_name', or set 'save.overwrite' = true")
    return run_id


def _saved_before(path: Path, name: str, step: int, epoch: int) -> bool:
    """`path` is a step or epoch save at or before (step, epoch)."""
    found = re.match(re.escape(name) + r"-(?:step(\d{8})|(\d{6}))\b", path.name)
    if not found:
        return False
    return int(found[1]) <= step if found[1] else int(found[2]) <= epoch


def _check_writable(out: Path, source: str) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{source}: 'train.output_dir': {out} is a file, not a folder")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{source}: 'train.output_dir': {out} cannot be made: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "is" if existing == out else f"is under {existing}, which is"
        raise ConfigError(f"{source}: 'train.output_dir': {out} {where} read-only for this user")


class OutputLock:
    """An advisory lock on output_dir for the run's life: a second run into the same folder is refused
    while this one runs. POSIX record locks are the process's: the kernel drops them when it dies (a killed
    run leaves no blocker), and a process that locks again (tests running one run after another) keeps its."""

    def __init__(self, out_dir: Path):
        import fcntl

        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / LOCK_NAME
        self._file = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.lockf(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise ConfigError(f"'train.output_dir': another run ({holder}) is writing to {out_dir}; wait for it "
                              f"to end or choose another output_dir") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()}")
        self._file.flush()


def claim_output_dir(cfg) -> OutputLock:
    """The main process's hold on output_dir for the run's life (keep the returned lock referenced), and the
    run's id if the config check did not set one."""
    cfg.run_id = cfg.run_id or new_run_id()
    return OutputLock(Path(cfg.train.output_dir))
