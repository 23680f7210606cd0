"""Merge adapter files into a model's weights, and the command that writes the merged single file:

    python -m networks.merge --model base.safetensors --network x.safetensors --ratio 0.8 --out merged.safetensors

kohya / LyCORIS files are merged by the published formulas, without peft (what UIs do):
    LoRA / LoCon  delta = (alpha / rank) * up @ down          (convs: up is 1x1, down carries the kernel)
    LoHa          delta = (alpha / rank) * (w1_a @ w1_b) * (w2_a @ w2_b)   (Tucker: t x_1 a x_2 b per factor)
    LoKr          delta = scale * kron(w1, w2), each w full or a @ b (w2 Tucker with t2); scale alpha / rank,
                  or 1 when neither is factored
    OFT / BOFT    W' = T W, T the block rotations of oft_blocks (networks/oft.py), alpha the norm constraint
    DoRA          W' = (W + delta) * dora_scale / ||W + delta||, per input column for a (1, in) dora_scale
                  (ours, LyCORIS wd_on_output=False, what every UI applies), per output row for LyCORIS'
                  default (out, 1) (as LyCORIS itself applies it)
    W' = W + ratio * (merged - W).
A layer a family's files fuse (FLUX double_blocks_0_img_attn_qkv: to_q, to_k, to_v) is merged into the parts'
weights stacked along the output rows, then split back (exact for any algorithm: the delta's rows are the parts').
peft-layout files (save_format = "peft") are merged by injecting the adapter and merging it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from networks import dora, oft
from networks.lycoris_format import LoraFileError, file_names
from networks.peft_format import target_prefixes


@torch.no_grad()
def merge_lora(modules: dict[str, nn.Module], targets, path: str, ratio: float = 1.0) -> int:
    """Add a kohya / LyCORIS file's deltas into `modules` (component name -> module) in place; returns
    layers merged. `targets` are the family's AdapterTargets (each component's kohya prefix)."""
    tensors = load_file(path)
    layers: dict[str, list[nn.Module]] = {}
    for target in targets:
        found = {p: m for p, m in modules[target.component].named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
        layers.update({name: [found[p] for p in paths] for name, paths in file_names(target, found).items()})
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        grouped.setdefault(name, {})[suffix] = value.float()
    unknown = sorted(set(grouped) - set(layers))
    if unknown:
        raise LoraFileError(f"{path}: no layer for {unknown[:5]}")
    for name, parts in grouped.items():
        weights = [m.weight for m in layers[name]]
        before = torch.cat([w.float() for w in weights])
        merged = before + ratio * (merged_weight(before, parts) - before)
        for weight, rows in zip(weights, merged.split([w.shape[0] for w in weights])):
            weight.copy_(rows.to(weight.dtype))
    return len(grouped)


def merged_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    if "oft_blocks" in parts:  # OFT / BOFT: the output rows rotated, alpha the constraint (networks/oft.py)
        constraint = float(parts["alpha"]) if "alpha" in parts else 0.0
        return oft.rotate_rows(oft.rotation(parts["oft_blocks"], constraint), weight)
    delta = layer_delta(parts, weight.shape)
    if "dora_scale" not in parts:
        return weight + delta
    combined, scale = weight + delta, parts["dora_scale"]
    eps = torch.finfo(torch.float32).eps
    if scale.shape[0] == 1 and weight.shape[0] != 1:  # input axis
        shape = dora.file_shape(weight)
        return combined * (scale.reshape(shape) / dora.column_norm(combined).reshape(shape))
    norm = combined.reshape(combined.shape[0], -1).norm(dim=1) + eps
    return combined * (scale.flatten() / norm).reshape(-1, *[1] * (weight.dim() - 1))


def layer_delta(parts: dict[str, torch.Tensor], shape) -> torch.Tensor:
    if "lora_down.weight" in parts:
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        return _scale(parts, down.shape[0]) * (up.flatten(1) @ down.flatten(1)).reshape(shape)
    if "hada_w1_a" in parts:
        w1 = _factor(parts, "hada_w1_a", "hada_w1_b", "hada_t1")
        w2 = _factor(parts, "hada_w2_a", "hada_w2_b", "hada_t2")
        return _scale(parts, parts["hada_w1_b"].shape[0]) * (w1.reshape(shape) * w2.reshape(shape))
    if "lokr_w1" in parts or "lokr_w1_a" in parts:
        w1 = parts["lokr_w1"] if "lokr_w1" in parts else parts["lokr_w1_a"] @ parts["lokr_w1_b"]
        w2 = parts["lokr_w2"] if "lokr_w2" in parts else _factor(parts, "lokr_w2_a", "lokr_w2_b", "lokr_t2")
        factored = [parts[k].shape[0] for k in ("lokr_w1_b", "lokr_w2_b") if k in parts]
        scale = _scale(parts, factored[0]) if factored else 1.0
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return scale * torch.kron(w1, w2.contiguous()).reshape(shape)
    raise LoraFileError(f"no formula for a layer with keys {sorted(parts)} (OFT files: peft layout)")


def _factor(parts, a: str, b: str, tucker: str) -> torch.Tensor:
    if tucker in parts:  # Tucker: t (r, r, kh, kw) with a (r, out), b (r, in)
        return torch.einsum("i j k l, j r, i p -> p r k l", parts[tucker], parts[b], parts[a])
    return parts[a] @ parts[b].flatten(1)


def _scale(parts, rank: int) -> float:
    return float(parts["alpha"]) / rank if "alpha" in parts else 1.0


@torch.no_grad()
def merge_peft(modules: dict[str, nn.Module], targets, path: str, ratio: float = 1.0) -> int:
    """Merge a peft-layout file with peft: inject the adapter its metadata describes, load it, merge,
    and put the plain layers back."""
    from networks import files
    from networks.targets import inject

    tensors, metadata = files.read(path)
    settings = settings_of(metadata)
    adapted = [inject(modules[t.component], t, settings) for t in targets
               if any(k.startswith(target_prefixes(t)) for k in tensors)]
    loaded = files.load_into(adapted, path)
    for component in adapted:
        for module_path, layer in list(component.adapter_layers()):
            base = layer.get_base_layer()
            before = base.weight.detach().clone()
            layer.merge()
            base.weight.copy_(before + ratio * (base.weight - before))
            parent_path, _, child = module_path.rpartition(".")
            setattr(component.module.get_submodule(parent_path) if parent_path else component.module, child, base)
    return loaded


def settings_of(metadata: dict[str, str]):
    """The NetworkSettings a file's ss_* metadata describes."""
    from library.config import parse_kv_args
    from networks.settings import settings_from

    args = parse_kv_args([f"{k}={v}" for k, v in json.loads(metadata.get("ss_network_args", "{}")).items()])
    return settings_from({"module": metadata.get("ss_network_module", "networks.lora"),
                          "dim": int(metadata["ss_network_dim"]), "alpha": float(metadata["ss_network_alpha"]),
                          **args})


def merge_file(modules: dict[str, nn.Module], targets, path: str, ratio: float) -> int:
    from networks import files

    keys = files.read(path)[0].keys()
    prefixes = tuple(p for t in targets for p in target_prefixes(t))
    if keys and all(k.startswith(prefixes) for k in keys):
        return merge_peft(modules, targets, path, ratio)
    return merge_lora(modules, targets, path, ratio)


def components_in_file(targets, keys) -> set[str]:
    """The components (denoiser, te1, ...) an adapter file's keys adapt, by kohya or diffusers prefix."""
    found = set()
    for t in targets:
        prefixes = (t.kohya_prefix + "_", f"lora_{t.diffusers_prefix}_", *target_prefixes(t))
        if any(k.startswith(prefixes) for k in keys):
            found.add(t.component)
    return found


def _arguments(argv):
    p = argparse.ArgumentParser(prog="python -m networks.merge", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="base model: single file or diffusers folder")
    p.add_argument("--network", required=True, nargs="+", help="adapter file(s), merged in order")
    p.add_argument("--ratio", type=float, nargs="+", default=[1.0], help="strength, one per file (or one for all)")
    p.add_argument("--out", required=True, help="merged single file (.safetensors, original layout)")
    p.add_argument("--tokenizer", help="tokenizer folder, for single files (as model.tokenizer)")
    p.add_argument("--arch", help="shipped architecture name or folder, for single files (as model.arch)")
    for name in ("vae", "clip_l", "clip_g", "t5xxl", "ae", "text_encoder"):
        p.add_argument(f"--{name}", help=f"separate {name} file beside a single-file model (as model.{name})")
    p.add_argument("--precision", choices=("float", "fp16", "bf16"), default="float")
    a = p.parse_args(argv)
    if len(a.ratio) not in (1, len(a.network)):
        p.error(f"--ratio: {len(a.ratio)} values for {len(a.network)} networks (give one, or one per network)")
    return a


def main(argv: list[str] | None = None) -> int:
    a = _arguments(argv)
    from library.families import ModelSource, get_family
    from library.loading import CheckpointError
    from networks import files

    missing = [path for path in a.network if not Path(path).is_file()]
    if missing:
        print(f"merge error: {missing[0]}: no such adapter file", file=sys.stderr)
        return 2
    source = ModelSource(a.model, tokenizer=a.tokenizer, arch=a.arch, vae=a.vae, clip_l=a.clip_l,
                         clip_g=a.clip_g, t5xxl=a.t5xxl, ae=a.ae, text_encoder=a.text_encoder)
    try:
        family = get_family("auto", a.model)
        parts = family.load(source)
    except (CheckpointError, OSError, ValueError) as e:
        print(f"merge error: {a.model}: {e}", file=sys.stderr)
        return 2
    modules = {"denoiser": parts.denoiser, **parts.text_encoders}
    targets = family.adapter_targets(parts)
    ratios = a.ratio * len(a.network) if len(a.ratio) == 1 else a.ratio
    touched: set[str] = set()
    for path, ratio in tqdm(list(zip(a.network, ratios)), desc="merging", unit="file", disable=len(ratios) < 2):
        try:
            merged = merge_file(modules, targets, path, ratio)
            touched |= components_in_file(targets, files.read(path)[0].keys())
        except (LoraFileError, OSError, KeyError, ValueError) as e:
            print(f"merge error: {e if isinstance(e, LoraFileError) else f'{path}: {e}'}", file=sys.stderr)
            return 2
        print(f"merged {path} at ratio {ratio:g}: {merged} layers")
    dtype = files.SAVE_DTYPES[a.precision]
    metadata = {"merged_from": json.dumps([a.model, *a.network]), "merge_ratios": json.dumps(ratios)}
    _write(Path(a.out), family.single_file_state_dict(parts), dtype, metadata)
    separate = family.separate_files(parts)
    for component, (name, state) in separate.items():
        if component in touched:  # the single file leaves this encoder out: its merged weights beside it
            _write(Path(a.out).with_name(f"{Path(a.out).stem}_{name}.safetensors"), state, dtype, metadata)
    return 0


def _write(path: Path, state: dict[str, torch.Tensor], dtype: torch.dtype, metadata: dict[str, str]) -> None:
    from networks import files

    files.save(path, {k: v.detach().to(dtype).contiguous() for k, v in state.items()}, metadata)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
