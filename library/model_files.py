"""The model and adapter files a config names, checked before any model loads, and errors while loading them,
both as one ConfigError line naming the config key and the file (the CLI exits 2).

Checked before loading, from headers and first bytes only (a few kB per file):
  - a hub id that is not in the local cache when the hub cannot be reached (HF_HUB_OFFLINE, or no network);
  - a folder that holds no model (no model_index.json, unet/ or transformer/), or lacks a part its family
    loads (the family's folder_parts);
  - a .safetensors file that is empty, truncated or has a damaged header (every file key, and every
    .safetensors file in a folder a key names), or whose header names a ComfyUI quantized format other than
    scaled fp8 (library/fp8_scaled.py);
  - a .ckpt / .pt that is neither a zip-format torch checkpoint nor a pickle, or a truncated zip;
  - a model file of another family than model.family, or that its family cannot load as named (the families'
    recognises / single_file_problem, reading the header's names and shapes);
  - network_weights made for another family or another network_dim (its ss_* metadata).
What only loading can tell (a pickle that would construct objects, an adapter whose shapes differ without
metadata saying so) is raised by the loaders and named here by `loading_errors`.
"""
from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from library.config import Config, ConfigError
from library.config_checks import HUB_ID
from library.fp8_scaled import header_problem
from library.loading import CheckpointError, SafetensorsHeader, pickle_problem, read_safetensors_header

MODEL_KEY = "model.pretrained_model_name_or_path"
FILE_KEYS = (MODEL_KEY, "model.vae", "model.clip_l", "model.clip_g", "model.t5xxl", "model.ae", "model.text_encoder",
             "network.network_weights")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
FOLDER_MARKERS = ("model_index.json", "unet", "transformer")


def named_files(cfg: Config) -> dict[str, str]:
    """Config key -> the file or folder it names, for every file key that is set."""
    out = {}
    for key in FILE_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name, None)
        if value:
            out[key] = str(value)
    return out


def fail(cfg: Config, key: str, message: str) -> ConfigError:
    """The one-line error: the config file, the key in quotes, then what is wrong (naming the file)."""
    return ConfigError(f"{cfg.source}: '{key}': {' '.join(message.split())}")


def check_files(cfg: Config) -> dict[str, SafetensorsHeader | None]:
    """The checks that read files only (no torch, no model code: they run first, within a second): every file
    key's file can be read, a hub id can be reached, a folder holds a model. Returns the .safetensors headers."""
    headers = {key: _check_file(cfg, key, value) for key, value in named_files(cfg).items()}
    model = cfg.model.pretrained_model_name_or_path
    if _is_hub_id(model):
        _check_hub_id(cfg, model)
    elif os.path.isdir(model):
        _check_model_folder(cfg, model)
    return headers


def check_model_files(cfg: Config):
    """Every check above that the config's information allows, before any model loads; ConfigError on the first
    problem. The family checks import the model families (diffusers). Returns the family found (None where
    only loading can tell)."""
    headers = check_files(cfg)
    model = cfg.model.pretrained_model_name_or_path
    family = None if _is_hub_id(model) else _check_family(cfg, headers.get(MODEL_KEY))  # a hub id: once loaded
    if family is not None:
        _check_control_images(cfg, family)
        _check_llm_adapter(cfg, family)
    if headers.get("network.network_weights"):
        _check_network_weights(cfg, headers["network.network_weights"], family)
    return family


def _check_llm_adapter(cfg: Config, family) -> None:
    """network_args train_llm_adapter=True (sd-scripts' lora_anima) needs a family with an LLM adapter."""
    from networks.settings import wants_llm_adapter

    if wants_llm_adapter(cfg.network) and not family.has_llm_adapter:
        raise fail(cfg, "network.network_args", f"train_llm_adapter=True adapts Anima's LLM adapter; a "
                                                f"{family.name} model has none: drop it")


def _check_file(cfg: Config, key: str, value: str) -> SafetensorsHeader | None:
    """The header of a .safetensors file (None for other files and folders), after checking it can be read;
    in a folder (a diffusers model or VAE), every .safetensors file of it and its subfolders."""
    path = Path(value)
    if path.is_dir():
        for part in sorted([*path.glob("*.safetensors"), *path.glob("*/*.safetensors")]):
            _check_file(cfg, key, str(part))
        return None
    if not path.is_file():
        return None
    try:
        if path.suffix.lower() == ".safetensors":
            header = read_safetensors_header(path)
            problem = header_problem(header.metadata)  # ComfyUI's quantized formats other than scaled fp8
            if problem:
                raise CheckpointError(f"{path}: {problem}")
            return header
        if path.suffix.lower() in PICKLE_SUFFIXES:
            problem = pickle_problem(path)
            if problem:
                raise CheckpointError(problem)
    except CheckpointError as e:
        raise fail(cfg, key, str(e)) from None
    return None


def _is_hub_id(value: str) -> bool:
    return not os.path.exists(value) and bool(HUB_ID.match(value))


def _check_hub_id(cfg: Config, repo_id: str) -> None:
    """A hub id loads from the local cache, or downloads when the hub can be reached; else say so now."""
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "model_index.json"), str):
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    why = "HF_HUB_OFFLINE is set" if offline else _hub_unreachable()
    if why:
        raise fail(cfg, MODEL_KEY, f"{repo_id} is a hub id that is not in the local Hugging Face cache, and {why}: "
                                   f"download it first (huggingface-cli download {repo_id}) or give a local folder "
                                   f"or .safetensors file")


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the hub's host cannot be reached (one TCP connection, a few seconds at most), None if it can."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host} cannot be reached ({e.strerror or type(e).__name__})"
    return None


def _check_model_folder(cfg: Config, folder: str) -> None:
    path = Path(folder)
    if any((path / marker).exists() for marker in FOLDER_MARKERS):
        return
    singles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in (".safetensors", *PICKLE_SUFFIXES))
    hint = f"; it holds {', '.join(singles[:3])}: give that file instead" if singles else ""
    raise fail(cfg, MODEL_KEY, f"{folder} is a folder without a model (no model_index.json, unet/ or transformer/: "
                               f"not a diffusers model folder){hint}")


def _check_family(cfg: Config, header: SafetensorsHeader | None):
    """The family that will load the model, after checking the model is one of its; None where only loading
    can tell (a pickle with family = "auto")."""
    from library.families import get_family

    path, wanted = cfg.model.pretrained_model_name_or_path, cfg.model.family
    if header is not None:
        return _check_file_family(cfg, header)
    if os.path.isdir(path):
        return _check_folder_family(cfg, path)
    return None if wanted == "auto" else get_family(wanted, path)


def _check_folder_family(cfg: Config, path: str):
    """A diffusers folder: the families' claims() read its model_index.json and subfolders."""
    from library.families import get_family, registered

    wanted = cfg.model.family
    claimed = [f.name for f in registered() if f.claims(path)]
    if not claimed:
        return None
    if wanted != "auto" and wanted not in claimed:
        raise fail(cfg, MODEL_KEY, f"{path} is a model folder of family \"{claimed[0]}\", but 'model.family' = "
                                   f"\"{wanted}\": set model.family = \"{claimed[0]}\" (or \"auto\")")
    family = get_family(claimed[0] if wanted == "auto" else wanted, path)
    missing = [part for part in family.folder_parts if not (Path(path) / part).is_dir()]
    if missing:
        raise fail(cfg, MODEL_KEY, f"{path} has no {', '.join(p + '/' for p in missing)} (a {family.name} model "
                                   f"folder needs {', '.join(p + '/' for p in family.folder_parts)}): an incomplete "
                                   f"download?")
    return family


def _check_file_family(cfg: Config, header: SafetensorsHeader):
    """A single file: the family its tensor names say, and whether that family can load it as the config
    names its parts (the family's single_file_problem: shapes, separate files)."""
    from library.families import ModelSource, get_family, registered

    from library.fp8_scaled import header_view

    path, wanted = cfg.model.pretrained_model_name_or_path, cfg.model.family
    tensors = header_view(header.tensors)  # ComfyUI's fp8-scaled files: the weights they load as
    found = [f for f in registered() if f.recognises(tensors)]
    if not found:
        raise fail(cfg, MODEL_KEY, f"{path} is not a checkpoint of any family this trainer knows (sd1, sdxl, sd3, "
                                   f"flux: no U-Net or transformer keys they use; a VAE, text encoder or adapter "
                                   f"file?)")
    family = found[0] if wanted == "auto" else get_family(wanted, path)
    if family not in found:
        raise fail(cfg, MODEL_KEY, f"{path} is a checkpoint of family \"{found[0].name}\" (from its tensor names), "
                                   f"but 'model.family' = \"{wanted}\": set model.family = \"{found[0].name}\" "
                                   f"(or \"auto\")")
    problem = family.single_file_problem(tensors, ModelSource.from_section(cfg.model))
    if problem:
        raise fail(cfg, MODEL_KEY, f"{path}: {problem}")
    return family


def _check_control_images(cfg: Config, family) -> None:
    """Control (reference) images only for a family that reads them (edit models); else one error naming the key."""
    from library.data.dataset_config import read_layout

    if family.takes_control_images:
        return
    where = [s.where for d in read_layout(cfg).datasets for s in d.subsets if s.control_dir is not None]
    if where:
        key = "dataset.control_directory" if cfg.dataset.control_directory else "dataset.dataset_config"
        raise ConfigError(f"{cfg.source}: '{key}': control (reference) images train edit models (FLUX.1 Kontext, "
                          f"FLUX.2, Qwen-Image-Edit); a {family.name} model takes none ({', '.join(where)}): "
                          "remove control_directory")


def _check_network_weights(cfg: Config, header: SafetensorsHeader, family) -> None:
    n, meta, key = cfg.network, header.metadata, "network.network_weights"
    version = meta.get("ss_base_model_version")
    if family is not None and version and version not in family.adapter_base_versions:
        raise fail(cfg, key, f"{n.network_weights} was made for {version} (metadata ss_base_model_version), this "
                             f"model is {family.name} ({', '.join(family.adapter_base_versions)})")
    dim = meta.get("ss_network_dim")
    if dim and dim.isdigit() and int(dim) != n.network_dim and not n.block_dims:
        raise fail(cfg, key, f"{n.network_weights} has network_dim {dim} (metadata ss_network_dim), the config says "
                             f"'network.network_dim' = {n.network_dim}: set it to {dim} to continue from this file")


@contextlib.contextmanager
def loading_errors(cfg: Config):
    """Errors while loading the files the config names, as one ConfigError naming the key: the loaders'
    CheckpointError / LoraFileError, and OSError from diffusers / transformers (a folder missing a part, a hub
    download that failed)."""
    from networks.lycoris_format import LoraFileError

    try:
        yield
    except CheckpointError as e:
        raise fail(cfg, e.key or _key_named_in(cfg, str(e)), str(e)) from None
    except LoraFileError as e:
        raise fail(cfg, "network.network_weights", str(e)) from None
    except OSError as e:
        raise fail(cfg, _key_named_in(cfg, str(e)), f"{type(e).__name__}: {str(e).strip().splitlines()[0]}") \
            from None


def _key_named_in(cfg: Config, message: str) -> str:
    """The key whose file the message names (the longest such value: a VAE inside the model folder is the VAE);
    the model key if none."""
    named = [(len(value), key) for key, value in named_files(cfg).items() if value in message]
    return max(named)[1] if named else MODEL_KEY


def load_model(cfg: Config):
    """(family, its loaded Components) of the config's model; a loading error is a ConfigError naming the key."""
    from library.families import ModelSource, get_family
    from library.fp8_scaled import attach, keeping

    m = cfg.model
    with loading_errors(cfg), keeping(cfg.train.fp8_base) as scaled:  # fp8_base keeps fp8-scaled files' bytes
        family = get_family(m.family, m.pretrained_model_name_or_path)
        parts = family.load(ModelSource.from_section(m))
        attach(parts.denoiser, scaled)
        return family, parts
