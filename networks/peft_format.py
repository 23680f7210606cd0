"""The peft / diffusers file layout (`save_format = "peft"`): peft's own parameter names under the
diffusers component prefix, `unet.down_blocks.0.attentions.0.proj_in.lora_A.weight`,
`text_encoder.text_model.encoder.layers.0.mlp.fc1.hada_w1_a`, `unet....oft_R.weight`, ... (the adapter
name dropped, as diffusers' `save_lora_weights` writes LoRA). Each layer's (rank, alpha) is kept in the
metadata key `lt_peft_layers` (JSON), since peft keeps them in its config, not in tensors.

The only layout for OFT and BOFT, whose peft rotation has no LyCORIS file form.
"""
from __future__ import annotations

import json

import torch

from networks import algorithms
from networks.lycoris_format import LoraFileError
from networks.targets import AdaptedComponent, in_llm_adapter

LAYERS_KEY = "lt_peft_layers"


def prefix(component: AdaptedComponent) -> str:
    return component.target.diffusers_prefix or component.target.component


def target_prefixes(target) -> tuple[str, ...]:
    """The key prefixes of an AdapterTarget's layers: its own, and its LLM adapter's (Anima: `text_conditioner.`)."""
    own = f"{target.diffusers_prefix or target.component}."
    return (own, target.llm_adapter_path + ".") if target.llm_adapter_path else (own,)


def layer_name(component: AdaptedComponent, path: str) -> str:
    """`text_encoder.text_model.encoder.layers.0.mlp.fc1`: CLIP keys keep the `text_model.` segment ComfyUI's key
    map (comfy/lora.py model_lora_keys_clip) and older diffusers expect, where transformers 5 dropped it from the
    module path (diffusers removes it again when it loads). A layer of the component's LLM adapter is keyed by its
    module path alone (`text_conditioner.blocks.0.self_attn.q_proj`: diffusers' Anima pipeline loads that
    component apart from the transformer)."""
    if in_llm_adapter(component.target, path):
        return path
    return f"{prefix(component)}.{component.target.kohya_path_prefix}{path}"


def _names(component: AdaptedComponent, path: str) -> tuple[str, ...]:
    """The names a layer may have in files: ours, and the module path without the segment (older files)."""
    return tuple(dict.fromkeys((layer_name(component, path), f"{prefix(component)}.{path}")))


def is_peft_layout(keys, adapted: list[AdaptedComponent]) -> bool:
    known = tuple(p for c in adapted for p in target_prefixes(c.target)) + ("unet.", "text_encoder.", "transformer.")
    return bool(keys) and all(k.startswith(known) for k in keys)


def state_dict(adapted: list[AdaptedComponent], dtype: torch.dtype = torch.float32):
    """(tensors, extra metadata) of every adapter parameter in peft naming."""
    out, layers = {}, {}
    for component in adapted:
        for path, layer in component.adapter_layers():
            name = layer_name(component, path)
            for param_name, param in algorithms.parameters(layer).items():
                out[f"{name}.{param_name}"] = param.detach().to("cpu", dtype).contiguous()
            layers[name] = list(component.layers[path])
    return out, {LAYERS_KEY: json.dumps(layers)}


def load_into(adapted: list[AdaptedComponent], tensors: dict[str, torch.Tensor], metadata: dict,
              source: str) -> int:
    """Check every key, shape and (rank, alpha) first, then copy: never a half-loaded adapter."""
    params, ranks = {}, {}
    for component in adapted:
        for path, layer in component.adapter_layers():
            for name in _names(component, path):
                ranks[name] = component.layers[path]
                params.update({f"{name}.{n}": p for n, p in algorithms.parameters(layer).items()})
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise LoraFileError(f"{source}: {len(unknown)} key(s) match no parameter of this network (another "
                            f"family, algorithm or target set?): {unknown[:5]}")
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(params[key].shape):
            raise LoraFileError(f"{source}: {key} has shape {tuple(value.shape)}, this network expects "
                                f"{tuple(params[key].shape)} (network_dim / conv_dim / factor differ?)")
    file_layers = json.loads(metadata.get(LAYERS_KEY, "{}"))
    for name, (rank, alpha) in file_layers.items():
        if name in ranks and (rank, round(alpha, 6)) != (ranks[name][0], round(ranks[name][1], 6)):
            raise LoraFileError(f"{source}: {name} was trained with (rank, alpha) = ({rank}, {alpha:g}), "
                                f"the config gives {ranks[name]}")
    with torch.no_grad():
        for key, value in tensors.items():
            params[key].copy_(value)
    return sum(any(k.startswith(name + ".") for k in tensors) for name in ranks)
