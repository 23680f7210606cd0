"""The adapter algorithms: LoRA / LoCon / DoRA (peft's LoraConfig, DoRA's decomposition ours: networks/dora.py),
LoHa (LoHaConfig), LoKr (LoKrConfig), OFT / BOFT (ours: networks/oft.py). This module says how our settings
become a peft config, and names each layer's parameters the way LyCORIS / kohya files do.

Facts the file layout depends on (read from peft 0.21 and LyCORIS / ComfyUI sources):
- LoRA: lora_A = kohya lora_down, lora_B = lora_up, scale alpha / rank.
- DoRA: decomposed along the input axis (networks/dora.py says why), a LoRA variant of ours on top of
  peft's LoRA; the magnitude (in,) is the file's `dora_scale` of shape (1, in) or (1, in, 1, 1).
- LoHa / LoKr: peft's parameter names and shapes are LyCORIS' (hada_w1_a..., lokr_w1, lokr_w2_a...,
  hada_t1 / lokr_t2 with use_tucker), scale alpha / rank. LoKr's Tucker w2 is written in the plain form
  (lokr_w2_a @ lokr_w2_b) that ComfyUI can apply (networks/tucker.py). One difference: a LoKr layer whose w1 and
  w2 are both full matrices has scale 1 in LyCORIS (alpha is ignored, files store alpha = rank), while
  peft scales it by alpha / rank; such layers are given alpha = rank here, as LyCORIS does.
- OFT / BOFT: not peft's (which rotates the layer's input), but networks/oft.py, which rotates the output
  as LyCORIS' `oft_blocks` files do; the file holds the blocks and alpha = the norm constraint.
"""
from __future__ import annotations

import re

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig
from torch import nn

from networks import dora, tucker
from networks.settings import NetworkSettings

ADAPTER = "default"
LORA_FILE_NAMES = {"lora_down.weight": "lora_A", "lora_up.weight": "lora_B"}
LYCORIS_NAMES = {"loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
                 "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
                 "oft": ("oft_blocks",), "boft": ("oft_blocks",)}


def peft_config(s: NetworkSettings, layers: dict[str, tuple[int, float]]):
    """The peft config that puts algorithm `s.algo` into exactly `layers` (path -> (rank, alpha))."""
    targets = sorted(layers)
    ranks = {_exact(n): r for n, (r, a) in layers.items() if r != s.dim}
    alphas = {_exact(n): a for n, (r, a) in layers.items() if a != s.alpha}
    if s.is_lora:
        return LoraConfig(r=s.dim, lora_alpha=s.alpha, lora_dropout=s.dropout or 0.0, target_modules=targets,
                          rank_pattern=ranks, alpha_pattern=alphas, use_dora=False,
                          init_lora_weights=True)  # DoRA: networks/dora.py, attached after injection
    common = dict(r=s.dim, alpha=s.alpha, rank_dropout=s.rank_dropout, module_dropout=s.module_dropout,
                  target_modules=targets, rank_pattern=ranks, alpha_pattern=alphas,
                  use_effective_conv2d=s.use_tucker)
    if s.algo == "loha":
        return LoHaConfig(**common)
    if s.algo == "lokr":
        return LoKrConfig(**common, decompose_both=s.decompose_both, decompose_factor=s.factor)
    raise ValueError(f"unknown algorithm {s.algo}")


def _exact(name: str) -> str:
    """A peft rank/alpha pattern (a regex matched at the end of the path) for exactly this module path."""
    return re.escape(name)


def after_injection(s: NetworkSettings, layer: nn.Module, rank_alpha: tuple[int, float]) -> tuple[int, float]:
    """Bring a fresh peft layer to LyCORIS' convention where they differ; returns its (rank, alpha)."""
    rank, alpha = rank_alpha
    if s.algo == "dora":
        dora.attach(layer, ADAPTER)
    if s.algo == "lokr" and ADAPTER in layer.lokr_w1 and ADAPTER in layer.lokr_w2:
        layer.alpha[ADAPTER], layer.scaling[ADAPTER] = float(rank), 1.0
        return rank, float(rank)
    return rank, alpha


def parameters(layer: nn.Module) -> dict[str, nn.Parameter]:
    """Every trainable adapter parameter of one peft layer, by peft's name without the adapter name
    ("lora_A.weight", "hada_w1_a", "oft_R.weight", "lora_magnitude_vector.weight", ...)."""
    out = {}
    for attr in layer.adapter_layer_names:
        container = getattr(layer, attr, None)
        if container is None or ADAPTER not in container:
            continue
        item = container[ADAPTER]
        if isinstance(item, nn.Parameter):
            out[attr] = item
        else:
            out.update({f"{attr}.{name}": p for name, p in item.named_parameters()})
    return out


def up_parameters(layer: nn.Module) -> list[nn.Parameter]:
    """LoRA+'s "B" matrices (lora_up): the ones that get loraplus_lr_ratio x the learning rate."""
    return [layer.lora_B[ADAPTER].weight]


# ---- the LyCORIS / kohya file layout of one layer --------------------------------------------------


def file_tensors(algo: str, layer: nn.Module) -> dict[str, torch.Tensor]:
    """suffix -> tensor in file layout ("lora_down.weight", "dora_scale", "hada_w1_a", "lokr_w1", ...)."""
    params = parameters(layer)
    if algo == "lokr" and "lokr_t2" in params:  # Tucker w2 in the plain form UIs apply (networks/tucker.py)
        plain = tucker.to_file(*(params[k] for k in tucker.TUCKER_KEYS))
        return {**{k: v for k, v in params.items() if k not in tucker.TUCKER_KEYS}, **plain}
    if algo in LYCORIS_NAMES:
        return dict(params)
    out = {suffix: params[f"{attr}.weight"] for suffix, attr in LORA_FILE_NAMES.items()}
    if algo == "dora":
        magnitude = params["lora_magnitude_vector.weight"]
        out["dora_scale"] = magnitude.reshape(dora.file_shape(layer.get_base_layer().weight))
    return out


def expected_file_shapes(algo: str, layer: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in file_tensors(algo, layer).items()}


@torch.no_grad()
def load_file_tensors(algo: str, layer: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy a layer's file tensors (already checked: same suffixes and shapes) into peft's parameters."""
    params = parameters(layer)
    if "lokr_t2" in params:  # the file's plain w2 back into Tucker factors
        shapes = (params["lokr_t2"].shape, params["lokr_w2_b"].shape[1])
        tensors = {**tensors, **tucker.from_file(tensors["lokr_w2_a"], tensors["lokr_w2_b"], *shapes)}
    for suffix, value in tensors.items():
        if suffix == "dora_scale":
            param = params["lora_magnitude_vector.weight"]
        else:
            param = params[LORA_FILE_NAMES[suffix] + ".weight" if suffix in LORA_FILE_NAMES else suffix]
        param.copy_(value.reshape(param.shape))


def algorithm_of_suffixes(suffixes: set[str]) -> str:
    """Which algorithm a file layer's keys belong to (for errors: 'the file holds loha')."""
    if any(s.startswith("hada_") for s in suffixes):
        return "loha"
    if any(s.startswith("lokr_") for s in suffixes):
        return "lokr"
    if any(s.startswith("oft_") for s in suffixes):
        return "oft"  # or boft: the blocks' shape tells
    if "dora_scale" in suffixes:
        return "dora"
    if "lora_down.weight" in suffixes:
        return "lora"
    return "unknown"
