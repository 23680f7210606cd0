"""Latent and text-encoder output caches, in memory or as files (cache_latents_to_disk,
cache_text_encoder_outputs_to_disk).

A cache file is a safetensors file whose metadata records everything its tensors depend on: for latents the
family, a fingerprint of the VAE weights and their dtype, the image file (path, size, modification time),
the size it was resized to, the crop and bucket, whether a flipped variant and an alpha mask are stored; for
text-encoder outputs the family, a fingerprint of the text encoders, clip_skip and the caption. A file whose
record differs from what the run needs is stale: it is rebuilt (and the reason printed), never reused.
Files are written to a temporary name and renamed, so an interrupted run leaves no half file under a name
that is trusted later. The folder is dataset.cache_dir (default output_dir/cache), never the image folders.

    python -m library.data.cache --config my.toml      # build the disk caches alone, before training
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from library.data.control import control_path, control_pixels
from library.data.images import load_pixels, plan_crop
from library.data.plan import ImageRecord
from library.data.report import CountingBar
from library.memory import host_copy

CACHE_FORMAT = 1
SAMPLED_VALUES = 4096  # per tensor, for the weight fingerprint
TEXT_BATCH = 32  # captions per text-encoder call when caching


def fingerprint(modules) -> str:
    """A short hash of the weights of `modules`: names, shapes, dtypes and evenly spaced values of each."""
    h = hashlib.sha256()
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // SAMPLED_VALUES)][:SAMPLED_VALUES]
            h.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            h.update(sample.float().cpu().numpy().tobytes())
    return h.hexdigest()[:20]


def file_identity(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


class DiskCache:
    """Files `name`.safetensors in `folder`, each with its dependency record in the metadata."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.safetensors"

    def status(self, name: str, depends_on: dict) -> str:
        """"valid", "missing", or "stale: <what differs>"."""
        from safetensors import safe_open

        path = self.path(name)
        if not path.is_file():
            return "missing"
        try:
            with safe_open(str(path), "pt") as f:
                recorded = json.loads((f.metadata() or {}).get("depends_on", "{}"))
        except Exception:
            return "stale: unreadable file"
        differs = sorted(k for k in depends_on.keys() | recorded.keys() if depends_on.get(k) != recorded.get(k))
        return "valid" if not differs else f"stale: {', '.join(differs)} changed"

    def load(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(self.path(name))

    def save(self, name: str, tensors: dict[str, torch.Tensor], depends_on: dict) -> Path:
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(name)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"depends_on": json.dumps(depends_on, sort_keys=True)})
        os.replace(tmp, path)
        return path


# ---- latents ----------------------------------------------------------------------------------


@dataclass
class LatentCacheSettings:
    to_disk: bool
    folder: Path
    vae_batch_size: int
    seed: int


def latent_dependencies(family_name: str, vae_id: str, dtype, record: ImageRecord) -> dict:
    crop = plan_crop(record.size, record.bucket)
    a = record.subset.augment
    control = {"control": file_identity(control_path(record))} if record.subset.control_dir is not None else {}
    return {"kind": "latents", "format": CACHE_FORMAT, "family": family_name, "vae": vae_id, "dtype": str(dtype),
            "image": file_identity(record.path), "resized": list(crop.resized), "crop": [crop.top, crop.left],
            "bucket": list(record.bucket), "flip_variant": a.flip_aug, "alpha_mask": a.alpha_mask, **control}


def latent_name(record: ImageRecord) -> str:
    key = hashlib.sha1(str(record.path.resolve()).encode()).hexdigest()[:20]
    return f"{record.path.stem[:40]}-{key}-{record.bucket[0]}x{record.bucket[1]}"


@torch.no_grad()
def cache_latents(family, parts, dataset, settings: LatentCacheSettings, say=print) -> None:
    """Fill dataset.latents (memory) or dataset.latent_files (disk), encoding only what is missing or stale."""
    vae_id, dtype = fingerprint([parts.vae]), next(parts.vae.parameters()).dtype
    disk = DiskCache(Path(settings.folder) / "latents") if settings.to_disk else None
    depends = {i: latent_dependencies(family.name, vae_id, dtype, r) for i, r in enumerate(dataset.items)}
    statuses = {i: disk.status(latent_name(dataset.items[i]), d) if disk else "missing" for i, d in depends.items()}
    todo = [i for i, s in statuses.items() if s != "valid"]
    stored: dict[int, dict] = {}
    generator = torch.Generator().manual_seed(settings.seed)
    bar = CountingBar(len(todo), "caching latents")
    for chunk in _same_size_chunks(dataset.items, todo, settings.vae_batch_size):
        for i, tensors in zip(chunk, _encode_chunk(family, parts, [dataset.items[i] for i in chunk], generator)):
            if disk:
                disk.save(latent_name(dataset.items[i]), tensors, depends[i])
            else:
                stored[i] = tensors
        bar.advance(len(chunk))
    bar.close()
    if disk:
        dataset.latent_files = {i: disk.path(latent_name(r)) for i, r in enumerate(dataset.items)}
    else:
        dataset.latents = stored
    say(f"latents: {len(depends)} images, {len(depends) - len(todo)} reused from {disk.folder if disk else 'memory'}"
        f", {len(todo)} encoded{_reasons(statuses)}")


def _reasons(statuses: dict) -> str:
    counts = Counter(s for s in statuses.values() if s != "valid")
    return f" ({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))})" if counts else ""


def _same_size_chunks(records: list[ImageRecord], indices: list[int], size: int) -> list[list[int]]:
    by_bucket: dict = {}
    for i in indices:
        by_bucket.setdefault(records[i].bucket, []).append(i)
    return [group[k:k + size] for group in by_bucket.values() for k in range(0, len(group), size)]


def _encode_chunk(family, parts, records: list[ImageRecord], generator) -> list[dict]:
    loaded = [load_pixels(r.path, r.orientation, plan_crop(r.size, r.bucket), False, r.subset.augment.alpha_mask)
              for r in records]
    pixels = torch.stack([p for p, _ in loaded])
    latents = family.encode_images(parts, pixels, generator).cpu()
    flipped = any(r.subset.augment.flip_aug for r in records)
    latents_flipped = family.encode_images(parts, pixels.flip(-1), generator).cpu() if flipped else None
    controls = _encode_controls(family, parts, records, generator, flipped)
    out = []
    for k, (record, (_, mask)) in enumerate(zip(records, loaded)):
        tensors = {"latents": latents[k]}
        if record.subset.augment.flip_aug:
            tensors["latents_flipped"] = latents_flipped[k]
        if controls:
            tensors["control_latents"] = controls["control_latents"][k]
            if record.subset.augment.flip_aug:
                tensors["control_latents_flipped"] = controls["control_latents_flipped"][k]
        if mask is not None:
            small = torch.nn.functional.interpolate(mask[None], size=latents.shape[-2:], mode="area")[0]
            tensors |= {"mask": small, "mask_flipped": small.flip(-1)}
        out.append(tensors)
    return out


def _encode_controls(family, parts, records: list[ImageRecord], generator, flipped: bool) -> dict:
    """Edit pairs: the records' control images encoded as their images are (and flipped); {} without controls."""
    if any(r.subset.control_dir is None for r in records):
        return {}
    pixels = torch.stack([control_pixels(r, False) for r in records])
    out = {"control_latents": family.encode_images(parts, pixels, generator).cpu()}
    if flipped:
        out["control_latents_flipped"] = family.encode_images(parts, pixels.flip(-1), generator).cpu()
    return out


# ---- text-encoder outputs -----------------------------------------------------------------------


def text_dependencies(family_name: str, encoders_id: str, clip_skip: int, caption: str, source=None) -> dict:
    """What a cached text output depends on: the encoders' weights, clip_skip, the caption, and the
    model keys that change the encoders' output (token lengths, T5's padding mask)."""
    t5 = {k: getattr(source, k, None) for k in ("t5xxl_max_token_length", "apply_t5_attn_mask", "max_token_length")}
    return {"kind": "text", "format": CACHE_FORMAT, "family": family_name, "text_encoders": encoders_id,
            "clip_skip": clip_skip, "caption": caption, **t5}


def text_name(caption: str, clip_skip: int, apart: str | None = None) -> str:
    key = f"{clip_skip}\n{caption}" if apart is None else f"{apart}\n{clip_skip}\n{caption}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


@torch.no_grad()
def cache_text_outputs(family, parts, captions: list[str], clip_skip: int, folder: Path | None,
                       say=print, device=None, batch_size: int = TEXT_BATCH,
                       apart: str | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """caption -> family.encode_prompts output (batch of one), kept in host memory (pinned when `device`, by
    default the first encoder's, is CUDA): each batch's share goes to the device when it trains (batch_loss),
    not the whole cache for the whole run. From disk where valid, else encoded in batches of `batch_size`
    captions (and saved). With `apart` (the family's cached_apart encoder), only that encoder's share:
    family.encode_apart, while the others train."""
    encoders = [parts.text_encoders[apart]] if apart else list(parts.text_encoders.values())
    device = torch.device(device or next(encoders[0].parameters()).device)

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        return host_copy(tensor, pin=device.type == "cuda")

    disk = DiskCache(Path(folder) / "text") if folder else None
    encoders_id = fingerprint(encoders)
    source = getattr(parts, "source", None)
    depends = {c: {**text_dependencies(family.name, encoders_id, clip_skip, c, source), "apart": apart}
               for c in captions}
    names = {c: text_name(c, clip_skip, apart) for c in captions}
    statuses = {c: disk.status(names[c], depends[c]) if disk else "missing" for c in captions}
    out = {c: {k: keep(v) for k, v in disk.load(names[c]).items()}
           for c in captions if statuses[c] == "valid"}
    missing = [c for c in captions if statuses[c] != "valid"]
    bar = CountingBar(len(missing), "caching text-encoder outputs" + (f" ({apart} only)" if apart else ""))
    for start in range(0, len(missing), batch_size):
        batch = missing[start:start + batch_size]
        encoded = family.encode_apart(parts, batch) if apart else family.encode_prompts(parts, batch, clip_skip)
        for i, caption in enumerate(batch):
            out[caption] = {k: keep(v[i:i + 1]) for k, v in encoded.items()}
            if disk:
                disk.save(names[caption], out[caption], depends[caption])
            bar.advance()
    bar.close()
    reused = len(captions) - len(missing)
    say(f"text-encoder outputs{f' of {apart}' if apart else ''}: {len(captions)} captions, {reused} reused, "
        f"{len(missing)} encoded{_reasons(statuses)}")
    return out


# ---- running it alone ---------------------------------------------------------------------------


def cache_folder(cfg) -> Path:
    return Path(cfg.dataset.cache_dir or Path(cfg.train.output_dir) / "cache")


def main(argv: list[str] | None = None) -> int:
    from library import cli
    from library.data import DatasetError
    from library.data.plan import plan_data
    from library.data.training_set import TrainingSet
    from library.families import ModelSource, get_family
    from library.memory import cast_frozen_parts, weight_dtype
    from library.quantization import quantize_base, store_t5
    from library.training import cache_outputs

    cli.quiet_libraries()
    cfg = cli.load_or_exit(cli.parse_args(argv, __doc__), recipe="network")
    try:
        dataset = TrainingSet(plan_data(cfg), cfg.train.seed or 0, cfg.dataset.prior_loss_weight)
    except DatasetError as e:
        print(f"dataset error: {e}", file=sys.stderr)
        return 3
    m, t = cfg.model, cfg.train
    family = get_family(m.family, m.pretrained_model_name_or_path)
    parts = family.load(ModelSource.from_section(m))  # as the recipes load it: the caches then match theirs
    dtype = weight_dtype(t.mixed_precision)
    for module in [parts.denoiser, parts.vae, *parts.text_encoders.values()]:
        module.requires_grad_(False)
    quantize_base(parts, m.base_model_precision, dtype, keep_t5=m.t5xxl_precision != "auto")
    cast_frozen_parts(parts, dtype, t.no_half_vae)
    store_t5(parts, m.t5xxl_precision, dtype)
    cfg.dataset.cache_latents_to_disk = True
    t.cache_text_encoder_outputs_to_disk = t.cache_text_encoder_outputs or t.cache_text_encoder_outputs_to_disk
    cache_outputs(cfg, family, parts, dataset, True, "cuda" if torch.cuda.is_available() else "cpu", print)
    return 0


if __name__ == "__main__":
    sys.exit(main())
