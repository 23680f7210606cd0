"""The kohya / LyCORIS file layout: what ComfyUI, A1111/Forge, diffusers `load_lora_weights`, sd-scripts
and LyCORIS read.

Key = prefix + "_" + module path with "." replaced by "_", then the algorithm's suffixes:
LoRA / LoCon `.lora_down.weight`, `.lora_up.weight`; DoRA adds `.dora_scale`; LoHa `.hada_w1_a`,
`.hada_w1_b`, `.hada_w2_a`, `.hada_w2_b` (+ `.hada_t1`, `.hada_t2` with use_tucker); LoKr `.lokr_w1` or
`.lokr_w1_a`/`.lokr_w1_b`, `.lokr_w2` or `.lokr_w2_a`/`.lokr_w2_b` (a Tucker w2 written in that plain form,
networks/tucker.py); OFT / BOFT `.oft_blocks` (3-d / 4-d); every layer `.alpha` (a scalar: the delta is scaled
by alpha / rank; for OFT / BOFT the norm constraint).

Where a family's checkpoints name layers otherwise (AdapterTarget.kohya_layout: FLUX `double_blocks_0_img_attn_qkv`,
`single_blocks_0_linear1`, `double_blocks_0_img_mlp_0`, ...), files use those names, as sd-scripts writes them and
ComfyUI, Forge and diffusers read them: a renamed layer under its name, a fused layer's parts (q, k, v) as one
LoRA (networks/fused.py). Parts that cannot be fused (LoHa, LoKr, DoRA, or a group not all adapted) are
written each under `lora_<diffusers prefix>_<module path>` (`lora_transformer_transformer_blocks_0_attn_to_q`;
so is a layer the family's checkpoints have no name for, SD3's last context modulation whose rows they order
otherwise;
OneTrainer's naming, which ComfyUI and Forge apply to the part's slice of the fused weight; diffusers loads no
LyCORIS FLUX file). Loading accepts all of these, and the module-path names files had before
(`lora_unet_transformer_blocks_0_attn_to_q`).
"""
from __future__ import annotations

import torch

from networks import algorithms, fused
from networks.targets import AdaptedComponent


class LoraFileError(Exception):
    """An adapter file that does not fit the network the config describes; names the offending keys."""


def kohya_name(target, module_path: str) -> str:
    """lora_unet_down_blocks_0_attentions_0_proj_in, lora_te_text_model_encoder_layers_0_mlp_fc1, ..."""
    return f"{target.kohya_prefix}_{(target.kohya_path_prefix + module_path).replace('.', '_')}"


def _file_name(target, name: str) -> str:
    return f"{target.kohya_prefix}_{name.replace('.', '_')}"


def part_name(target, module_path: str) -> str:
    """A fused layer's part written on its own: lora_transformer_transformer_blocks_0_attn_to_q."""
    if not target.diffusers_prefix:
        return kohya_name(target, module_path)
    return f"lora_{target.diffusers_prefix}_{module_path.replace('.', '_')}"


def file_names(target, paths) -> dict[str, tuple[str, ...]]:
    """Every file layer name that holds layers among module `paths` -> those paths (fused parts in order):
    module-path names, and with kohya_layout the renamed layers, the fused layers whose parts are all in
    `paths`, and the parts' own names."""
    names = {kohya_name(target, p): (p,) for p in paths}
    groups: dict[str, list] = {}
    for p in paths:
        found = target.kohya_layout(p) if target.kohya_layout else None
        if found:
            name, index, count = found
            groups.setdefault(name, [None] * count)[index] = p
        if target.kohya_layout and (found is None or found[2] > 1):
            names[part_name(target, p)] = (p,)
    names.update({_file_name(target, n): tuple(g) for n, g in groups.items() if None not in g})
    return names


def layers_by_file_name(adapted: list[AdaptedComponent]) -> dict[str, tuple[AdaptedComponent, tuple[str, ...]]]:
    """File layer name -> (component, the module paths it holds). Besides file_names, a family's other
    naming (SDXL's SAI `input_blocks_4_1_...`, which sd-scripts writes) is accepted where it names one layer."""
    names = {n: (c, paths) for c in adapted for n, paths in file_names(c.target, list(c.layers)).items()}
    aliases: dict[str, list] = {}
    for c in adapted:
        if c.target.kohya_names:
            for p in c.layers:
                aliases.setdefault(_file_name(c.target, c.target.kohya_names(p)), []).append((c, (p,)))
    names.update({name: found[0] for name, found in aliases.items() if len(found) == 1 and name not in names})
    return names


def layers_to_save(component: AdaptedComponent) -> list[tuple[str, tuple[str, ...]]]:
    """(file layer name, module paths it holds) for every adapted layer: module-path names, or the family's
    names (kohya_layout) with a group of parts fused where all are adapted with one (rank, alpha) and the
    algorithm fuses, else each part under part_name."""
    target, out, groups = component.target, [], {}
    for path, _ in component.adapter_layers():
        found = target.kohya_layout(path) if target.kohya_layout else None
        if found is None:  # a layer the family's checkpoints cannot name: its diffusers name, as parts are
            out.append((part_name(target, path) if target.kohya_layout else kohya_name(target, path), (path,)))
        elif found[2] == 1:
            out.append((_file_name(target, found[0]), (path,)))
        else:
            groups.setdefault(found[0], [None] * found[2])[found[1]] = path
    for name, paths in groups.items():
        if None not in paths and component.algo in fused.FUSABLE and len({component.layers[p] for p in paths}) == 1:
            out.append((_file_name(target, name), tuple(paths)))
        else:
            out.extend((part_name(target, p), (p,)) for p in paths if p is not None)
    return out


def state_dict(adapted: list[AdaptedComponent], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every adapter weight in kohya / LyCORIS naming, on the CPU, in `dtype` (alpha too)."""
    out = {}
    for component in adapted:
        layers = dict(component.adapter_layers())
        for name, paths in layers_to_save(component):
            parts = [algorithms.file_tensors(component.algo, layers[p]) for p in paths]
            for suffix, tensor in (fused.fuse(parts) if len(parts) > 1 else parts[0]).items():
                out[f"{name}.{suffix}"] = tensor.detach().to("cpu", dtype).contiguous()
            out[f"{name}.alpha"] = torch.tensor(component.layers[paths[0]][1] * len(paths), dtype=dtype)
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
    plan: dict[tuple[int, str], tuple] = {}
    layers = {id(c): dict(c.adapter_layers()) for c in adapted}
    for name, parts in sorted(grouped.items()):
        component, paths = by_name[name]
        found = layers[id(component)]
        for path, piece in zip(paths, _pieces(source, name, parts, component, paths, found)):
            if (id(component), path) in plan:
                raise LoraFileError(f"{source}: {name} and {plan[id(component), path][0]} hold the same layer {path}")
            layer = found[path]
            plan[id(component), path] = (name, component, layer, _checked(source, name, piece, component, path, layer))
    for _, component, layer, parts in plan.values():
        algorithms.load_file_tensors(component.algo, layer, parts)
    return len(plan)


def _pieces(source, name, parts, component: AdaptedComponent, paths, layers) -> list[dict[str, torch.Tensor]]:
    """A file layer's tensors for each module path it holds (a fused layer split into its parts);
    `layers`: the component's peft layers by path."""
    if len(paths) == 1:
        return [parts]
    sizes = [layers[p].get_base_layer().weight.shape[0] for p in paths]
    try:
        return fused.split(parts, sizes, component.layers[paths[0]][0])
    except ValueError as e:
        raise LoraFileError(f"{source}: {name} (a fused layer) {e}") from None


def _checked(source, name, parts, component: AdaptedComponent, path: str, layer) -> dict[str, torch.Tensor]:
    """The layer's tensors without alpha, after checking algorithm, key set, shapes and alpha."""
    expected = algorithms.expected_file_shapes(component.algo, layer)
    found_algo = algorithms.algorithm_of_suffixes(set(parts))
    kin = {"lora": ("locon", "dora"), "oft": ("boft",)}
    if found_algo != component.algo and component.algo not in kin.get(found_algo, ()):
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
