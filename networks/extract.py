"""Extract a LoRA from a fine-tuned model against its base, as sd-scripts' networks/extract_lora_from_models.py:

    python -m networks.extract --model_org base.safetensors --model_tuned tuned.safetensors --dim 8 --out x.safetensors

For every layer a LoRA of this family adapts (the same selection as training: Linear and 1x1 convs at --dim,
3x3 convs at --conv_dim when given), D = W_tuned - W_org is factored by SVD and kept at the layer's rank r:
up = U_r √(S_r / s), down = √(S_r / s) V_rᵀ with s = alpha / r, so (alpha / r) · up @ down is D's best rank-r
approximation (exact where D has rank r or less). A component whose weights differ nowhere by more than
--min_diff (a text encoder left frozen) gets no layers. The file is written in our kohya layout (or peft with
--save_format peft): the family's names, fused layers as sd-scripts writes them. Reported: the Frobenius
fraction of the fine-tune's change the LoRA keeps, per layer (worst) and overall.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from networks import files
from networks.settings import NetworkSettings
from networks.targets import AdaptedComponent, inject

SEPARATE = ("tokenizer", "arch", "vae", "clip_l", "clip_g", "t5xxl", "ae")


def changed_components(org, tuned, targets, min_diff: float) -> list:
    """The targets whose component's weights differ by more than min_diff somewhere."""
    out = []
    for t in targets:
        a, b = _module(org, t.component).state_dict(), _module(tuned, t.component).state_dict()
        if any((a[k].float() - b[k].float()).abs().max() > min_diff for k in a if a[k].is_floating_point()):
            out.append(t)
    return out


def _module(parts, component: str):
    return parts.denoiser if component == "denoiser" else parts.text_encoders[component]


@torch.no_grad()
def fit_layer(layer, difference: torch.Tensor, rank: int, alpha: float) -> tuple[float, float]:
    """Set one peft LoRA layer to the best rank-`rank` approximation of `difference`; returns (kept energy,
    total energy) in squared Frobenius norm."""
    u, s, vh = torch.linalg.svd(difference.double().flatten(1), full_matrices=False)
    k = min(rank, s.numel())
    root = (s[:k] / (alpha / rank)).sqrt()
    down = torch.zeros(rank, vh.shape[1], dtype=torch.float64)
    up = torch.zeros(u.shape[0], rank, dtype=torch.float64)
    down[:k], up[:, :k] = root[:, None] * vh[:k], u[:, :k] * root[None, :]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    a.copy_(down.reshape(a.shape).to(a.dtype))
    b.copy_(up.reshape(b.shape).to(b.dtype))
    return float((s[:k] ** 2).sum()), float((s ** 2).sum())


def extract(family, org, tuned, settings: NetworkSettings, min_diff: float, progress: bool = True):
    """(adapted components holding the LoRA, in `org`'s modules; {layer: retained}; overall retained)."""
    adapted: list[AdaptedComponent] = []
    report, kept, total = {}, 0.0, 0.0
    for target in changed_components(org, tuned, family.adapter_targets(org), min_diff):
        component = inject(_module(org, target.component), target, settings)
        tuned_module = _module(tuned, target.component)
        for path, layer in tqdm(list(component.adapter_layers()), desc=f"extracting {target.component}",
                                unit="layer", disable=not progress):
            base = layer.get_base_layer().weight
            difference = tuned_module.get_submodule(path).weight.double() - base.double()
            energy = fit_layer(layer, difference, *component.layers[path])
            report[f"{target.component}.{path}"] = math.sqrt(energy[0] / energy[1]) if energy[1] else 1.0
            kept, total = kept + energy[0], total + energy[1]
        adapted.append(component)
    return adapted, report, math.sqrt(kept / total) if total else 1.0


def _arguments(argv):
    p = argparse.ArgumentParser(prog="python -m networks.extract", description=__doc__.split("\n")[0])
    p.add_argument("--model_org", required=True, help="the base model: single file or diffusers folder")
    p.add_argument("--model_tuned", required=True, help="the fine-tuned model, same family and layout")
    p.add_argument("--dim", type=int, default=4, help="rank of Linear / 1x1 conv layers")
    p.add_argument("--conv_dim", type=int, help="rank of 3x3 convs (LoCon); none without it")
    p.add_argument("--alpha", type=float, help="network alpha (default: dim, scale 1)")
    p.add_argument("--min_diff", type=float, default=1e-6, help="a component changed by no more is left out")
    p.add_argument("--save_format", choices=files.FORMATS, default="kohya")
    p.add_argument("--precision", choices=tuple(files.SAVE_DTYPES), default="float")
    p.add_argument("--out", required=True)
    for name in SEPARATE:
        p.add_argument(f"--{name}", help=f"as model.{name}, for single files (both models)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = _arguments(argv)
    from library.families import ModelSource, get_family
    from library.loading import CheckpointError

    extra = {name: getattr(a, name) for name in SEPARATE}
    try:
        family = get_family("auto", a.model_org)
        org, tuned = (family.load(ModelSource(path, **extra)) for path in (a.model_org, a.model_tuned))
    except (CheckpointError, OSError, ValueError) as e:
        print(f"extract error: {e}", file=sys.stderr)
        return 2
    settings = NetworkSettings(dim=a.dim, alpha=a.alpha or float(a.dim), conv_dim=a.conv_dim,
                               conv_alpha=(a.alpha or float(a.conv_dim)) if a.conv_dim else None,
                               algo="locon" if a.conv_dim else "lora")
    adapted, report, retained = extract(family, org, tuned, settings, a.min_diff)
    if not adapted:
        print(f"extract error: {a.model_tuned} differs from {a.model_org} by at most {a.min_diff:g}", file=sys.stderr)
        return 2
    tensors, extra_meta = files.adapter_tensors(adapted, a.save_format, files.SAVE_DTYPES[a.precision])
    files.save(Path(a.out), tensors, {**_metadata(family, org, settings, retained), **extra_meta})
    print(f"{len(report)} layers, worst layer retained {min(report.values()):.6f}, Frobenius retained overall "
          f"{retained:.6f}; wrote {a.out}")
    return 0


def _metadata(family, parts, settings: NetworkSettings, retained: float) -> dict[str, str]:
    import json

    meta = {k: v + "/lora" if k == "modelspec.architecture" else v for k, v in family.file_metadata(parts).items()}
    network = files.network_metadata(settings)
    return {**meta, "ss_network_module": network["module"], "ss_network_dim": str(settings.dim),
            "ss_network_alpha": f"{settings.alpha:g}", "ss_network_args": json.dumps(network["args"]),
            "ss_training_comment": f"extracted by SVD, Frobenius retained {retained:.6f}"}


if __name__ == "__main__":
    sys.exit(main())
