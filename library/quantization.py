"""Quantized storage of frozen weights, through bitsandbytes: the whole frozen base (model.base_model_precision)
and the T5-XXL text encoder while it encodes captions (model.t5xxl_precision).

base_model_precision = int8 / nf4 (QLoRA): every nn.Linear of the frozen denoiser and text encoders becomes a
bitsandbytes layer before the adapters go in (quantize_base), quantized at once on the host, so host memory
shrinks too. peft builds its LoRA layers on bitsandbytes layers (adapters in full precision on top). int8 is
LLM.int8 (1 byte per weight + an fp32 scale per output row, outlier input features in 16-bit); nf4 is QLoRA's
4-bit NormalFloat with double-quantized block scales (~0.52 byte per weight). Generic over nn.Linear: every
family gets it, and convolutions (the SD U-Nets' ResNets), norms and embeddings keep their precision. The
planner counts the same bytes (library/planner/quantized.py: bitsandbytes does not run on fake tensors).

t5xxl_precision: the large text encoder while it encodes captions (T5-XXL, 4.76 billion parameters, 9.5 GB in
bf16; the language models of FLUX.2 (Qwen3-4B / 8B, Mistral-Small-3 24B), Qwen-Image (Qwen2.5-VL-7B) and
Z-Image (Qwen3-4B)): on a 12-16 GB card the encoding phase, not training, is what runs out of memory (FLUX.2
dev's Mistral takes 23.7 GiB in fp8). Applied to a frozen encoder before it moves to the device:

- fp8: every Linear weight stored as float8_e4m3fn and cast to the compute dtype layer by layer in forward
  (library.memory.store_fp8, what fp8_base does for the denoiser). Embeddings, layer norms and the relative
  attention bias stay as they are.
- int8: every Linear becomes a bitsandbytes LLM.int8 layer (int8_linear), as transformers'
  BitsAndBytesConfig(load_in_8bit=True) does for a folder; done here so that single files get it too.
- nf4: every Linear but a language model's lm_head (tied to the embedding, never read when encoding) becomes a
  bitsandbytes NF4 layer (nf4_linear), as BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
  does: ~0.52 byte per weight, a quarter of bf16. Chosen over visiting the device layer by layer (as block
  swap does for the denoiser): the encoder then stays on the card while it encodes, with no PCIe copy of the
  whole model per batch of captions, and the same layers serve sampling's prompts.

The outputs change slightly (fp8: ~2 significant digits per weight; nf4: 16 levels per 64-weight block);
caches record the precisions (their weight fingerprint sees the storage).
"""
from __future__ import annotations

import functools

import torch
from torch import nn

BASE_PRECISIONS = ("int8", "nf4")  # model.base_model_precision's quantized storages (config.py spells them)


def is_t5(module: nn.Module) -> bool:
    from transformers import T5EncoderModel

    return isinstance(module, T5EncoderModel)


TEXT_PRECISIONS = ("fp8", "int8", "nf4")  # model.t5xxl_precision's smaller storages (config.py spells them)
# the language models FLUX.2 (Qwen3 for klein, Mistral-Small-3 for dev), Qwen-Image (Qwen2.5-VL's language model)
# and Z-Image (Qwen3) encode captions with: 4 to 24 billion parameters, stored smaller the same way as T5
LANGUAGE_MODELS = ("Qwen3ForCausalLM", "Qwen3Model", "MistralModel", "Mistral3ForConditionalGeneration",
                   "Qwen2_5_VLTextModel", "Qwen2_5_VLForConditionalGeneration")


def is_stored_smaller(module: nn.Module) -> bool:
    """A text encoder model.t5xxl_precision applies to: T5, or one of the LANGUAGE_MODELS."""
    return is_t5(module) or type(module).__name__ in LANGUAGE_MODELS


def store_t5(parts, precision: str, compute_dtype: torch.dtype, make_layer=None) -> list[str]:
    """Apply `precision` to the frozen T5 encoders (and the LANGUAGE_MODELS) among parts.text_encoders; returns
    their names. int8 / nf4 Linears are made by `make_layer(linear, precision, compute_dtype)` (default
    bitsandbytes' layers; the planner passes its stand-in, library/planner/quantized.py)."""
    from library.config import ConfigError

    if precision == "auto":
        return []
    names = [name for name, encoder in parts.text_encoders.items() if is_stored_smaller(encoder)]
    if not names:
        raise ConfigError(f"model.t5xxl_precision = {precision!r}: this model has no T5 or language-model text "
                          f"encoder")
    for name in names:
        encoder = parts.text_encoders[name]
        if any(p.requires_grad for p in encoder.parameters()):
            raise ConfigError(f"model.t5xxl_precision = {precision!r}: the T5 encoder ({name}) would be trained; "
                              f"it can only be stored smaller while frozen")
        if precision == "fp8":
            store_fp8(encoder, compute_dtype)
        else:
            store_quantized(encoder, precision, compute_dtype, make_layer or bnb_linear)
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
    replace_linears(module, lambda layer: int8_linear(layer, threshold))


def store_quantized(module: nn.Module, precision: str, compute_dtype: torch.dtype, make_layer=None) -> int:
    """A frozen text encoder's Linears as `make_layer(linear, precision, compute)` makes them (bitsandbytes'
    int8 / nf4 layers by default), computing in the run's half precision; a language model's lm_head is left
    out for nf4 (tied to the embedding, never read when encoding), and so are the layers transformers keeps in
    full precision when it loads the model in 4 bits (nf4_kept). Returns how many were replaced."""
    compute = compute_dtype if compute_dtype.is_floating_point and compute_dtype.itemsize > 1 else torch.bfloat16
    make = make_layer or bnb_linear
    skip = nf4_kept(module) if precision == "nf4" else ()
    return replace_linears(module, lambda layer: make(layer, precision, compute), skip)


def nf4_kept(module: nn.Module) -> tuple[str, ...]:
    """Linears (by name) an nf4 text encoder keeps in its compute dtype: a language model's lm_head, and the
    model's _keep_in_fp32_modules, which transformers' 4-bit loading keeps too (T5's MLP output `wo`: T5 casts
    that layer's input to its weight's dtype, which would be the packed uint8 codes)."""
    return ("lm_head", *(getattr(module, "_keep_in_fp32_modules", None) or ()))


def replace_linears(module: nn.Module, make, skip: tuple[str, ...] = ()) -> int:
    """Every plain nn.Linear of `module` (but those whose own name is in `skip`) replaced by make(linear) in
    place; returns how many."""
    count = 0
    for parent in list(module.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child_name not in skip:
                setattr(parent, child_name, make(child))
                count += 1
    return count


def int8_linear(child: nn.Linear, threshold: float = 6.0) -> nn.Module:
    """A bitsandbytes LLM.int8 layer (int8_layer()) holding `child`'s weights, quantized now where they are
    (int8 weights, one fp32 scale per output row)."""
    import bitsandbytes as bnb

    layer = int8_layer()(child.in_features, child.out_features, bias=child.bias is not None,
                         has_fp16_weights=False, threshold=threshold, device="meta")
    layer.weight = bnb.nn.Int8Params(child.weight.data.to(torch.float16), requires_grad=False,
                                     has_fp16_weights=False)
    if child.bias is not None:
        layer.bias = nn.Parameter(child.bias.data, requires_grad=False)
    return layer.to(child.weight.device)  # Int8Params quantize when they move


def nf4_linear(child: nn.Linear, compute_dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes Linear4bit holding `child`'s weights as NF4, quantized now where they are (QLoRA's storage:
    4-bit codes, one absmax per 64 weights, itself quantized to 8 bits per 256 blocks), computing in
    `compute_dtype`. bitsandbytes' CPU path repacks the weights in place during a no-grad forward on the host
    (avx512-bf16 machines), in a layout that .to() does not undo: that repacking is off."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                              compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True, device="meta")
    layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                     compress_statistics=True, module=layer)
    if child.bias is not None:
        layer.bias = nn.Parameter(child.bias.data, requires_grad=False)
    layer.support_avx512bf16_for_cpu = False
    return layer.to(child.weight.device)  # Params4bit quantize when they move


def bnb_linear(child: nn.Linear, precision: str, compute_dtype: torch.dtype) -> nn.Module:
    """The bitsandbytes layer of base_model_precision `precision` holding `child`'s weights."""
    return int8_linear(child) if precision == "int8" else nf4_linear(child, compute_dtype)


def quantize_base(parts, precision: str, compute_dtype: torch.dtype, keep_t5: bool = False,
                  make_layer=bnb_linear) -> dict[str, int]:
    """base_model_precision: every nn.Linear of the frozen denoiser and text encoders (T5 and the language models
    too, unless `keep_t5`: model.t5xxl_precision stores them) replaced by `make_layer(linear, precision, compute_dtype)`, by default a
    bitsandbytes layer quantized at once on the host (int8: LLM.int8, 1 byte per weight + an fp32 scale per
    row; nf4: ~0.52 byte per weight). Convolutions, norms and embeddings keep their precision. Call it before the
    adapters go in: peft then builds its QLoRA layers (adapters in full precision over the quantized layer) on
    them. Returns the number of layers quantized per part ("denoiser", text-encoder names); {} for no_change."""
    if precision not in BASE_PRECISIONS:
        return {}
    chosen = {"denoiser": parts.denoiser, **{name: encoder for name, encoder in parts.text_encoders.items()
                                            if not (keep_t5 and is_stored_smaller(encoder))}}
    for name, module in chosen.items():
        if any(p.requires_grad for p in module.parameters()):
            raise ValueError(f"base_model_precision {precision}: {name} trains; only frozen weights are quantized")
    return {name: replace_linears(module, lambda layer: make_layer(layer, precision, compute_dtype))
            for name, module in chosen.items()}


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


def _bnb_kind(module: nn.Module) -> str | None:
    """"int8" / "nf4" for a bitsandbytes layer (by class name: no bitsandbytes import for other modules)."""
    names = {cls.__name__ for cls in type(module).__mro__}
    return "int8" if "Linear8bitLt" in names else "nf4" if "Linear4bit" in names else None


def quant_state_slots(module: nn.Module) -> list[tuple[object, str]]:
    """Where bitsandbytes keeps the quant state of `module`'s own weight outside parameters and buffers, as
    (object, attribute): what must travel with the weight's data when that moves by assignment (block swap).
    nf4: the block absmax, the code table and offset, and the nested absmax's own absmax and code; int8: the row
    scales, in the layer's matmul state, where its first forward puts them (put there now, as that forward does;
    the int8 codes are the weight's data, which the state's CB follows: tie_int8_state). [] for other layers."""
    kind = _bnb_kind(module)
    if kind == "int8":
        if module.weight.CB is not None:
            module.init_8bit_state()
        return [(module.state, "SCB")]
    if kind != "nf4":
        return []
    state = module.weight.quant_state
    slots = [(state, "absmax"), (state, "code"), (state, "offset")]
    if getattr(state, "nested", False):
        slots += [(state.state2, "absmax"), (state.state2, "code")]
    return [(owner, name) for owner, name in slots if isinstance(getattr(owner, name, None), torch.Tensor)]


def tie_int8_state(module: nn.Module) -> None:
    """An int8 layer's matmul state holds its weight's data as CB: after the data moved, CB is that data again."""
    if _bnb_kind(module) == "int8" and module.state.CB is not None:
        module.state.CB = module.weight.data


def weight_bytes(module: nn.Module) -> int:
    """Bytes the module's weights take as stored (int8 / float8 / 16-bit ...)."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
