"""The kohya / LyCORIS file layout: what ComfyUI, A1111/Forge, diffusers `load_lora_weights`, sd-scripts
and LyCORIS read.

Key = prefix + "_" + module path with "." replaced by "_", then the algorithm's suffixes:
LoRA / LoCon `.lora_down.weight`, `.lora_up.weight`; DoRA adds `.dora_scale`; LoHa `.hada_w1_a`,
`.hada_w1_b`, `.hada_w2_a`, `.hada_w2_b` (+ `.hada_t1`, `.hada_t2` with use_tucker); LoKr `.lokr_w1` or
`.lokr_w1_a`/`.lokr_w1_b`, `.lokr_w2` or `.lokr_w2_a`/`.lokr_w2_b` (+ `.lokr_t2`); every layer `.alpha`
(a scalar: the delta is scaled by alpha / rank).
"""
from __future__ import annotations

import torch

from networks import algorithms
from networks.targets import AdaptedComponent


class LoraFileError(Exception):
    """An adapter file that does not fit the network the config describes; names the offending keys."""


def kohya_name(target, module_path: str) -> str:
    """lora_unet_down_blocks_0_attentions_0_proj_in, lora_te_text_model_encoder_layers_0_mlp_fc1, ..."""
    return f"{target.kohya_prefix}_{(target.kohya_path_prefix + module_path).replace('.', '_')}"


def layers_by_file_name(adapted: list[AdaptedComponent]) -> dict[str, tuple[AdaptedComponent, str]]:
    """File layer name -> (component, module path). Besides the names we write, a family's other naming
    (SDXL's SAI `input_blocks_4_1_...`, which sd-scripts writes) is accepted where it names one layer."""
    names = {kohya_name(c.target, p): (c, p) for c in adapted for p in c.layers}
    aliases: dict[str, list] = {}
    for c in adapted:
        if c.target.kohya_names:
            for p in c.layers:
                aliases.setdefault(f"{c.target.kohya_prefix}_{c.target.kohya_names(p).replace('.', '_')}", []).append((c, p))
    names.update({name: found[0] for name, found in aliases.items() if len(found) == 1 and name not in names})
    return names


def state_dict(adapted: list[AdaptedComponent], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every adapter weight in kohya / LyCORIS naming, on the CPU, in `dtype` (alpha too)."""
    out = {}
    for component in adapted:
        for path, layer in component.adapter_layers():
            name = kohya_name(component.target, path)
            for suffix, tensor in algorithms.file_tensors(component.algo, layer).items():
                out[f"{name}.{suffix}"] = tensor.detach().to("cpu", dtype).contiguous()
            out[f"{name}.alpha"] = torch.tensor(component.layers[path][1], dtype=dtype)
    return out


def load_into(adapted: list[AdaptedComponent], tensors: dict[str, torch.Tensor], source: str) -> int:
    """Load kohya / LyCORIS tensors into the injected adapters: every key must find its layer, with the
    same algorithm, shapes and alpha, or nothing is loaded. Layers the file lacks keep their fresh
    initialisation. Returns the number of layers loaded."""
    by_name = layers_by_file_name(adapted)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        grouped.setdefault(name, {})[suffix] = value
    unknown = sorted(k for k in tensors if k.partition(".")[0] not in by_name)
    if unknown:
        raise LoraFileError(f"{source}: {len(unknown)} key(s) match no layer of this network (another model "
                            f"family, target set, conv_dim or block_dims?): {unknown[:5]}")
    plan = []
    for name, parts in sorted(grouped.items()):
        component, path = by_name[name]
        layer = dict(component.adapter_layers())[path]
        plan.append((component, layer, _checked(source, name, parts, component, path, layer)))
    for component, layer, parts in plan:
        algorithms.load_file_tensors(component.algo, layer, parts)
    return len(plan)


def _checked(source, name, parts, component: AdaptedComponent, path: str, layer) -> dict[str, torch.Tensor]:
    """The layer's tensors without alpha, after checking algorithm, key set, shapes and alpha."""
    expected = algorithms.expected_file_shapes(component.algo, layer)
    found_algo = algorithms.algorithm_of_suffixes(set(parts))
    if found_algo != component.algo and not (found_algo == "lora" and component.algo in ("locon", "dora")):
        raise LoraFileError(f"{source}: {name} holds {found_algo} weights ({sorted(parts)[:3]}), the config "
                            f"trains {component.algo}: set network.algo to the file's algorithm")
    weights = {k: v for k, v in parts.items() if k != "alpha"}
    if set(weights) != set(expected):
        missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
        raise LoraFileError(f"{source}: {name} lacks {missing} / has unexpected {extra} "
                            f"(other factor, decompose_both, use_tucker or rank than the config?)")
    for suffix, shape in expected.items():
        if tuple(weights[suffix].shape) != shape:
            raise LoraFileError(f"{source}: {name}.{suffix} has shape {tuple(weights[suffix].shape)}, this network "
                                f"expects {shape} (network_dim / conv_dim / factor differ?)")
    rank, alpha = component.layers[path]
    file_alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)  # kohya: no alpha means alpha = rank
    if abs(file_alpha - alpha) > 1e-3 * max(1.0, abs(alpha)):
        raise LoraFileError(f"{source}: {name}.alpha is {file_alpha:g}, the config says {alpha:g} "
                            f"(set network_alpha / conv_alpha / block_alphas to the file's values)")
    return weights
