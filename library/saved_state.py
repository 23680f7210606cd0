"""Saved training states, read and checked without torch: the config check runs these before any model
loads, so a damaged, foreign or missing state is one clear line within a second of starting. Writing and
restoring states is library/checkpoint.py."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from library.config import ConfigError

STATE_VERSION = 1
SHARDED = "sharded"  # the subfolder of an FSDP2 state: accelerator.save_state's shards of each process
# keys that may differ between the run that saved a state and the run resuming it
RESUME_MAY_CHANGE = {"train.max_train_steps", "train.max_train_epochs", "train.output_dir", "train.output_name",
                     "train.nan_skip_limit", "train.ddp_timeout",
                     "train.ddp_gradient_as_bucket_view", "train.ddp_static_graph", "dataset.max_data_loader_n_workers", "save", "sample", "logging"}


def recover_folder(path: Path) -> None:
    """A kill between save_folder's two renames leaves `path.old` (the previous good folder) and no `path`: it
    is put back. With `path` in place, a leftover `path.old` is the replaced copy and goes."""
    old = path.with_name(path.name + ".old")
    if old.is_dir() and not path.exists():
        os.replace(old, path)
    elif old.is_dir():
        shutil.rmtree(old, ignore_errors=True)


def find_state(resume: str, out_dir: Path, say=print) -> Path:
    """`resume` is a state folder, or "latest": the readable state in out_dir with the most steps (a corrupt
    older one beside it is named and passed over). ConfigError when there is none."""
    if resume != "latest":
        return Path(resume)
    for old in Path(out_dir).glob("*-state.old"):
        recover_folder(old.with_name(old.name[:-len(".old")]))
    steps, unreadable = {}, []
    for folder in sorted(Path(out_dir).glob("*-state")):
        try:
            steps[folder] = read_state_info(folder)["step"]
        except ConfigError as e:
            unreadable.append(str(e))
            say(f"passing over {folder.name}: {e}")
    if not steps:
        why = f" ({'; '.join(unreadable)})" if unreadable else ""
        raise ConfigError(f"no readable saved state (a *-state folder with state.json) in {out_dir}{why}")
    return max(steps, key=steps.get)


def read_state_info(folder: Path) -> dict:
    """state.json of a state folder, checked: readable, a known version, its weight and state files whole."""
    try:
        info = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        step, config = info["step"], info["config"]
    except FileNotFoundError:
        raise ConfigError(f"{folder}: not a saved state (no state.json in it)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{folder}/state.json is damaged ({type(e).__name__}: {e})") from None
    if info.get("version") != STATE_VERSION:
        raise ConfigError(f"{folder}: state format {info.get('version')!r}, this trainer reads {STATE_VERSION} "
                          f"(saved by another version of the trainer)")
    if not isinstance(step, int) or not isinstance(config, dict):
        raise ConfigError(f"{folder}/state.json is damaged (step {step!r})")
    weights = (_sharded_problem(folder / SHARDED, info.get("processes", 1), info["sharded"]) if info.get("sharded")
               else safetensors_problem(folder / "trained.safetensors"))
    problem = weights or _zip_problem(folder / "state.pt")
    if problem:
        raise ConfigError(f"{folder}: {problem}")
    return info


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a whole .safetensors file (missing, truncated, a garbage header), or None. Reads the
    header only."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                return f"{path.name} is truncated or not a .safetensors file ({size} bytes)"
            header = json.loads(f.read(n))
    except FileNotFoundError:
        return f"{path.name} is missing"
    except (ValueError, UnicodeDecodeError):
        return f"{path.name} has a damaged header (not a .safetensors file)"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
            and "data_offsets" in v]
    if ends and max(ends) > size - 8 - n:
        return f"{path.name} is truncated: its header needs {8 + n + max(ends)} bytes, the file has {size}"
    return None


def _sharded_problem(folder: Path, processes: int, engine: str = "fsdp2") -> str | None:
    """Why an FSDP2 / DeepSpeed state's shards are not whole: accelerator.save_state writes the model's and
    optimizer's shards (FSDP2: torch.distributed.checkpoint, a .metadata file written last; DeepSpeed: its
    checkpoint folder, one optimizer partition per process) and one RNG file per process."""
    if engine == "deepspeed":
        parts = [f"pytorch_model/zero_pp_rank_{i}_mp_rank_00_optim_states.pt" for i in range(processes)]
        parts += [f"random_states_{i}.pkl" for i in range(processes)]
        missing = [part for part in parts if not (folder / part).is_file()]
        return f"{SHARDED}/{missing[0]} is missing" if missing else None
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        if not (folder / part / ".metadata").is_file():
            return f"{SHARDED}/{part} is missing or incomplete (no .metadata)"
    missing = [i for i in range(processes) if not (folder / f"random_states_{i}.pkl").is_file()]
    return f"{SHARDED}/random_states_{missing[0]}.pkl is missing" if missing else None


def _zip_problem(path: Path) -> str | None:
    """torch.save writes a zip archive: a truncated one has lost its central directory at the end."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            z.namelist()
    except FileNotFoundError:
        return f"{path.name} is missing"
    except (zipfile.BadZipFile, OSError) as e:
        return f"{path.name} is damaged or truncated ({e})"
    return None


def check_resumable(folder: Path, config: dict) -> dict:
    """The saved state's info; ConfigError naming the problem: a damaged or foreign state, or every setting
    that differs in a way resuming cannot honour."""
    info = read_state_info(Path(folder))
    _check_engine(folder, info)
    differs = [key for key in sorted(set(_flat(config)) | set(_flat(info["config"])))
               if _flat(config).get(key) != _flat(info["config"]).get(key)
               and key not in RESUME_MAY_CHANGE and key.split(".")[0] not in RESUME_MAY_CHANGE]
    if differs:
        lines = [f"  {k}: saved {_flat(info['config']).get(k)!r}, now {_flat(config).get(k)!r}" for k in differs]
        raise ConfigError(f"{folder} was saved with another config; what differs:\n"
                          + "\n".join(lines))
    return info


def _check_engine(folder: Path, info: dict) -> None:
    """An FSDP2 state holds one shard per process: it resumes under FSDP2, with any number of processes
    (torch.distributed.checkpoint reshards the weights and optimizer state as it loads them); a state of the
    whole weights does not resume under FSDP2 (its optimizer state is not sharded)."""
    from library.engines import launched_engine, launched_processes

    if "deepspeed" in (info.get("sharded"), launched_engine()):
        return _check_deepspeed(folder, info)
    sharded, now = info.get("sharded"), launched_engine() == "fsdp2"
    saved, processes = info.get("processes", 1), launched_processes()
    if sharded and not now:
        raise ConfigError(f"{folder} holds FSDP2 shards of {saved} processes: resume it with `accelerate launch "
                          f"--use_fsdp --fsdp_version 2` (with any number of processes; this run: no FSDP2, "
                          f"{processes} processes)")
    if now and not sharded:
        raise ConfigError(f"{folder} was saved without FSDP2 (the whole weights and optimizer state): resume it "
                          f"as it was launched, without --use_fsdp")


def _check_deepspeed(folder: Path, info: dict) -> None:
    """A DeepSpeed state (the ZeRO partitions of each process, in DeepSpeed's checkpoint) resumes under DeepSpeed:
    with as many processes, or with another number when its optimizer is Adam / AdamW (resharded through
    DeepSpeed's universal checkpoint, library/deepspeed_states.py); ZeRO-3's (partitioned weights: a model file
    per process) under ZeRO-3, ZeRO-1/2's under ZeRO-1/2 (the stage as the launch names it; a DeepSpeed config
    file's is not checked); a state of another engine does not resume under DeepSpeed."""
    from library.deepspeed_states import reshard_problem
    from library.engines import launched_engine, launched_processes, launched_zero_stage

    sharded, now = info.get("sharded"), launched_engine()
    saved, processes = info.get("processes", 1), launched_processes()
    if sharded == "deepspeed" and now != "deepspeed":
        raise ConfigError(f"{folder} holds DeepSpeed ZeRO partitions of {saved} processes: resume it with "
                          f"`accelerate launch --use_deepspeed` and the same ZeRO stage (this run: no DeepSpeed, "
                          f"{processes} processes)")
    problem = reshard_problem(info.get("config", {}).get("optimizer", {}))
    if sharded == "deepspeed" and saved != processes and problem:
        raise ConfigError(f"{folder} holds DeepSpeed ZeRO partitions of {saved} processes, this run has "
                          f"{processes}: {problem}; resume it with `--num_processes {saved}`")
    if now == "deepspeed" and sharded != "deepspeed":
        raise ConfigError(f"{folder} was saved without DeepSpeed: resume it as it was launched, without "
                          f"--use_deepspeed")
    stage = launched_zero_stage()
    zero3 = (folder / SHARDED / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_model_states.pt").is_file()
    if stage is not None and zero3 != (stage == 3):
        raise ConfigError(f"{folder} was saved under ZeRO-{'3' if zero3 else '1/2'}, this run is launched with "
                          f"ZeRO-{stage}: resume it with `--zero_stage {'3' if zero3 else '2'}`")


def _flat(config: dict) -> dict:
    return {f"{section}.{key}": value for section, values in config.items() for key, value in values.items()}


def data_fingerprint(plan) -> dict:
    """What a state records of the data it trained on: each image with a digest of its caption, size and
    bucket, and the number of examples an epoch has."""
    import hashlib

    images = {str(r.path): hashlib.sha1(f"{r.caption}|{r.size}|{r.bucket}".encode()).hexdigest()[:12]
              for r in plan.images}
    return {"images": images, "examples": len(plan.entries)}


def data_changes(saved: dict | None, now: dict) -> str | None:
    """What differs between the data a state trained on and the data now, in one line; None if the same."""
    if not saved:
        return None
    before, after = saved.get("images", {}), now["images"]
    added, removed = sorted(set(after) - set(before)), sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    parts = [f"{len(v)} {what} (e.g. {v[0]})" for v, what in [(added, "images added"), (removed, "images removed"),
                                                             (changed, "images with another caption or size")] if v]
    if not parts and saved.get("examples") != now["examples"]:
        parts.append(f"examples per epoch {saved.get('examples')} -> {now['examples']} (repeats changed)")
    return "; ".join(parts) or None
