"""ComfyUI's fp8-scaled checkpoints (`*_fp8_scaled.safetensors`), read as the weights they stand for.

How ComfyUI writes them (comfy/utils.py convert_old_quants, comfy/ops.py, QUANTIZATION.md):
- the legacy layout: a Linear's `<layer>.weight` in float8_e4m3fn divided by a per-tensor scale, the scale
  beside it as `<layer>.scale_weight` (float32, one value), `<layer>.scale_input` (the activation scale of fp8
  matmuls, often 1.0), and a marker tensor `scaled_fp8` (under the checkpoint's model prefix, e.g.
  `model.diffusion_model.scaled_fp8`; its dtype is the fp8 dtype of the weights, float32 meaning e4m3fn);
- the newer layout: `<layer>.weight_scale` / `<layer>.input_scale`, with the layer's format in a
  `<layer>.comfy_quant` tensor (JSON as uint8) or in the `_quantization_metadata` JSON of the header.
Every other tensor (norms, biases, embeddings) is stored as usual (bf16 / fp16).

A weight is `weight.float() * scale` (ComfyUI's dequantization), stored here in the dtype of the file's
unquantized tensors (bf16 when the file has none): the run casts it to its own dtype afterwards, as it does any
file's weights. The activation scales and markers are dropped (the run computes in its own precision).

With fp8_base, loading under keeping() also remembers each per-tensor-scaled weight's float8 tensor and scale,
and attach() gives them to the layers that hold those weights: fp8_base then stores the file's own float8 bytes
and computes weight.to(dtype) * scale.to(dtype) as ComfyUI's scaled-fp8 layers do, instead of rounding the
dequantized weight to float8 a second time (library.memory.store_fp8). A weight a family's loader rebuilds
(fused, split) is not the dequantized tensor any more and is stored as any other weight.

Other ComfyUI formats (int8 block-wise, nvfp4, mxfp8) are refused by name. Nothing here knows a family: the
loaders' one reading function (library.loading.read_checkpoint) and the header check before loading
(library.model_files) call this.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from library.loading import TensorInfo

WEIGHT_SCALES = (".scale_weight", ".weight_scale")
DROPPED = (".scale_input", ".input_scale", ".comfy_quant")
MARKER = "scaled_fp8"
METADATA_KEY = "_quantization_metadata"
FORMATS = ("float8_e4m3fn", "float8_e5m2")  # per-tensor scaled fp8: the formats read here
FP8_HEADER_DTYPES = ("F8_E4M3", "F8_E5M2")
KEPT = "fp8_scaled_weight"  # the layer attribute attach() sets: (the file's float8 weight, its scale)
# while keeping(): the data_ptr of each dequantized weight -> (that tensor, the float8 weight, the scale); the
# dequantized tensor is held so that no other tensor gets its address before attach() looks
_KEEPING: list[dict] = []


class ScaledFp8Error(ValueError):
    """A quantized format this reader does not dequantize (the caller names the file)."""


def is_marker(name: str) -> bool:
    return name == MARKER or name.endswith("." + MARKER)


def _scale_key(name: str) -> str | None:
    return next((s for s in WEIGHT_SCALES if name.endswith(s)), None)


def _weight_of(scale_name: str) -> str:
    return scale_name[:-len(_scale_key(scale_name))] + ".weight"


def is_scaled(names) -> bool:
    """True if tensors of these names are an fp8-scaled file (a marker or a weight scale among them)."""
    return any(is_marker(n) or _scale_key(n) for n in names)


def header_view(tensors: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    """The names, dtypes and shapes a header describes as they will load: scales and markers gone, each scaled
    weight in the dtype of the file's unquantized tensors. What the families' header checks read."""
    if not is_scaled(tensors):
        return tensors
    dtype = _header_float(tensors)
    scaled = {_weight_of(n) for n in tensors if _scale_key(n)}
    return {n: info._replace(dtype=dtype) if n in scaled else info for n, info in tensors.items()
            if not (is_marker(n) or _scale_key(n) or n.endswith(DROPPED))}


def _header_float(tensors) -> str:
    floats = [i.dtype for n, i in tensors.items()
              if i.dtype in ("BF16", "F16", "F32") and not (_scale_key(n) or n.endswith(DROPPED))]
    return max(set(floats), key=floats.count) if floats else "BF16"


def dequantize(state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """`state` of an fp8-scaled file with every scaled weight dequantized (weight * scale) and the scales,
    activation scales and markers removed; any other state is returned as it is. ScaledFp8Error for a layer of
    a format other than per-tensor scaled fp8."""
    if not is_scaled(state):
        return state
    _check_formats(state, metadata or {})
    dtype = _float_dtype(state)
    out = {}
    for name, tensor in state.items():
        if is_marker(name) or _scale_key(name) or name.endswith(DROPPED):
            continue
        scale = next((state[name[:-len(".weight")] + s] for s in WEIGHT_SCALES
                      if name.endswith(".weight") and name[:-len(".weight")] + s in state), None)
        out[name] = tensor if scale is None else scaled_weight(tensor, scale, dtype, name)
        if scale is not None and scale.numel() == 1 and _KEEPING:
            _KEEPING[-1][out[name].data_ptr()] = (out[name], tensor, scale.reshape(()).float())
    return out


@contextmanager
def keeping(enabled: bool = True):
    """Loads under it remember each per-tensor-scaled weight's float8 tensor and scale (see the module's text);
    yields the record attach() reads. Disabled, it records nothing."""
    record: dict = {}
    if enabled:
        _KEEPING.append(record)
    try:
        yield record
    finally:
        if enabled:
            _KEEPING.remove(record)


def attach(module, record: dict) -> int:
    """Give each layer of `module` whose weight is a dequantized scaled weight of `record` its float8 weight and
    scale (the attribute KEPT); returns how many layers got them."""
    count = 0
    for layer in module.modules():
        weight = layer._parameters.get("weight")
        found = record.get(weight.data_ptr()) if weight is not None and not weight.is_meta else None
        if found is not None and found[0].shape == weight.shape and found[0].dtype == weight.dtype:
            setattr(layer, KEPT, found[1:])
            count += 1
    return count


def scaled_weight(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, name: str = "") -> torch.Tensor:
    """weight * scale in `dtype`: a per-tensor scale (one value), or one per output row."""
    scale = scale.float()
    if scale.numel() == 1:
        scale = scale.reshape(())
    elif scale.numel() == weight.shape[0]:
        scale = scale.reshape(-1, *[1] * (weight.dim() - 1))
    else:
        raise ScaledFp8Error(f"{name}: a scale of shape {tuple(scale.shape)} for a weight of shape "
                             f"{tuple(weight.shape)} (block-wise scales are not read here)")
    return (weight.float() * scale).to(dtype)


def _float_dtype(state) -> torch.dtype:
    """The dtype of the file's unquantized floating tensors (the most common), bf16 if there are none."""
    import torch

    floats = [t.dtype for n, t in state.items() if t.dtype in (torch.bfloat16, torch.float16, torch.float32)
              and not (_scale_key(n) or n.endswith(DROPPED))]
    return max(set(floats), key=floats.count) if floats else torch.bfloat16


def header_problem(metadata: dict[str, str]) -> str | None:
    """Why a file whose header has this metadata cannot be read here (layers of another ComfyUI quantized format,
    named in its _quantization_metadata), from the header alone; None if none."""
    try:
        _unread_formats(_metadata_formats(metadata))
    except ScaledFp8Error as e:
        return str(e)
    return None


def _metadata_formats(metadata: dict[str, str]) -> dict[str, str]:
    if METADATA_KEY not in metadata:
        return {}
    try:
        layers = json.loads(metadata[METADATA_KEY]).get("layers", {})
    except (ValueError, AttributeError):
        raise ScaledFp8Error(f"its {METADATA_KEY} metadata is not the JSON ComfyUI writes") from None
    return {k: (v.get("format") if isinstance(v, dict) else v) for k, v in layers.items()}


def _check_formats(state, metadata: dict[str, str]) -> None:
    formats = _metadata_formats(metadata)
    for name, tensor in state.items():
        if name.endswith(".comfy_quant"):
            try:
                formats[name[:-len(".comfy_quant")]] = json.loads(bytes(tensor.tolist()).decode()).get("format")
            except (ValueError, AttributeError):
                raise ScaledFp8Error(f"{name} is not the JSON ComfyUI writes") from None
    _unread_formats(formats)


def _unread_formats(formats: dict[str, str]) -> None:
    other = sorted({(str(f), layer) for layer, f in formats.items() if f not in FORMATS})
    if other:
        raise ScaledFp8Error(f"layers quantized as {other[0][0]!r} (e.g. {other[0][1]}); only ComfyUI's "
                             f"per-tensor scaled fp8 ({', '.join(FORMATS)}) is read: use a bf16 / fp16 / "
                             f"fp8_scaled file")
