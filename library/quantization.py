"""Smaller storage for the T5-XXL text encoder while it encodes captions (model.t5xxl_precision).

T5-XXL's 4.76 billion parameters take 9.5 GB in bf16: on a 12-16 GB card the encoding phase, not training,
is what runs out of memory. Two ways to halve it, both applied to a frozen encoder before it moves to the device:

- fp8: every Linear weight stored as float8_e4m3fn and cast to the compute dtype layer by layer in forward
  (library.memory.store_fp8, what fp8_base does for the denoiser). Embeddings, layer norms and the relative
  attention bias stay as they are.
- int8: every Linear becomes a bitsandbytes LLM.int8 layer (int8 weights, one fp32 scale per output row,
  outlier features above 6.0 in 16-bit), as transformers' BitsAndBytesConfig(load_in_8bit=True) does for a
  folder; done here so that single t5xxl files get it too. The weights are quantized when they move to the
  device.

The encoder's outputs change slightly (fp8: ~2 significant digits per weight); caches record the precision.
"""
from __future__ import annotations

import functools

import torch
from torch import nn


def is_t5(module: nn.Module) -> bool:
    from transformers import T5EncoderModel

    return isinstance(module, T5EncoderModel)


# the language models FLUX.2 encodes captions with (Qwen3 for klein, Mistral-Small-3 for dev): 8 to 24 billion
# parameters, stored smaller the same way while they encode
LANGUAGE_MODELS = ("Qwen3ForCausalLM", "Qwen3Model", "MistralModel", "Mistral3ForConditionalGeneration")


def is_stored_smaller(module: nn.Module) -> bool:
    """A text encoder model.t5xxl_precision applies to: T5, or one of the LANGUAGE_MODELS."""
    return is_t5(module) or type(module).__name__ in LANGUAGE_MODELS


def store_t5(parts, precision: str, compute_dtype: torch.dtype) -> list[str]:
    """Apply `precision` to the frozen T5 encoders (and FLUX.2's language models) among parts.text_encoders;
    returns their names."""
    from library.config import ConfigError

    if precision == "auto":
        return []
    names = [name for name, encoder in parts.text_encoders.items() if is_stored_smaller(encoder)]
    if not names:
        raise ConfigError(f"model.t5xxl_precision = {precision!r}: this model has no T5 text encoder")
    for name in names:
        encoder = parts.text_encoders[name]
        if any(p.requires_grad for p in encoder.parameters()):
            raise ConfigError(f"model.t5xxl_precision = {precision!r}: the T5 encoder ({name}) would be trained; "
                              f"it can only be stored smaller while frozen")
        if precision == "fp8":
            store_fp8(encoder, compute_dtype)
        else:
            store_int8(encoder)
    return names


def store_fp8(module: nn.Module, compute_dtype: torch.dtype) -> None:
    """T5's Linear weights in float8 (library.memory.store_fp8, as fp8_base stores the denoiser); embeddings
    and the relative attention bias stay as they are."""
    from library.memory import store_fp8 as store

    compute = compute_dtype if compute_dtype != torch.float8_e4m3fn else torch.bfloat16
    store(module, compute, skip=lambda name, layer: isinstance(layer, nn.Embedding) or name.endswith("lm_head"),
          what="t5xxl_precision fp8")  # a language model's lm_head may share the embedding's weight: not read anyway
    for name, layer in module.named_modules():  # T5's MLP casts its input to wo's storage dtype: undo that
        if name.endswith("DenseReluDense.wo"):
            layer.register_forward_pre_hook(lambda _, args: (args[0].to(compute), *args[1:]))


def store_int8(module: nn.Module, threshold: float = 6.0) -> None:
    """Every nn.Linear of `module` -> bitsandbytes Linear8bitLt (int8_layer()) holding the same weights."""
    import bitsandbytes as bnb

    layer_class = int8_layer()
    for parent in list(module.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            layer = layer_class(child.in_features, child.out_features, bias=child.bias is not None,
                                has_fp16_weights=False, threshold=threshold, device="meta")
            layer.weight = bnb.nn.Int8Params(child.weight.data.to(torch.float16), requires_grad=False,
                                             has_fp16_weights=False)
            if child.bias is not None:
                layer.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, child_name, layer)


@functools.cache
def int8_layer() -> type:
    """bitsandbytes' Linear8bitLt whose int8 state follows the layer. The int8 weights and their scales live in
    weight.CB / weight.SCB, then (after the first forward) in state.CB / state.SCB, which forward puts back
    into the weight. A parent's .to() reaches the layer through _apply, which moves parameters and buffers
    only: without this, T5's int8 weights stayed on the device after it left (or, quantized on the host,
    never came)."""
    import bitsandbytes as bnb

    class Linear8bitLt(bnb.nn.Linear8bitLt):  # the same name in module listings
        def _apply(self, fn, recurse=True):
            super()._apply(fn, recurse)
            weight, device = self.weight, self.weight.device
            if getattr(weight, "CB", None) is not None:
                weight.CB = weight.data
            if getattr(weight, "SCB", None) is not None:
                weight.SCB = weight.SCB.to(device)
            for name in ("CB", "SCB"):
                value = getattr(self.state, name)
                if value is not None:
                    setattr(self.state, name, weight.data if name == "CB" else value.to(device))
            return self

    return Linear8bitLt


def weight_bytes(module: nn.Module) -> int:
    """Bytes the module's weights take as stored (int8 / float8 / 16-bit ...)."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
