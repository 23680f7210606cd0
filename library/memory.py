"""Memory switches: precision of frozen and trainable weights, gradient checkpointing, attention backend."""
from __future__ import annotations

import torch
from torch import nn

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype frozen weights are stored in: half precision when training in mixed precision."""
    return DTYPES[mixed_precision]


def cast_frozen(module: nn.Module, dtype: torch.dtype) -> None:
    """Store every frozen parameter and buffer in `dtype`; trainable parameters are left as they are."""
    for param in module.parameters():
        if not param.requires_grad and param.is_floating_point():
            param.data = param.data.to(dtype)
    for buffer in module.buffers():
        if buffer.is_floating_point():
            buffer.data = buffer.data.to(dtype)


def cast_trainable(params: list[nn.Parameter], dtype: torch.dtype) -> None:
    for param in params:
        param.data = param.data.to(dtype)


def set_attention(denoiser: nn.Module, xformers: bool, sdpa: bool) -> str:
    """xformers when asked (checked installed by the config), else PyTorch SDPA, else plain attention."""
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    if not any(isinstance(m, Attention) for m in denoiser.modules()):
        return "sdpa (the model's own attention processors)"  # FLUX / SD3 attention classes: already SDPA
    if xformers:
        denoiser.enable_xformers_memory_efficient_attention()
        return "xformers"
    denoiser.set_attn_processor(AttnProcessor2_0() if sdpa else AttnProcessor())
    return "sdpa" if sdpa else "math"


def enable_gradient_checkpointing(denoiser: nn.Module, text_encoders: list[nn.Module]) -> None:
    denoiser.enable_gradient_checkpointing()
    for encoder in text_encoders:
        encoder.gradient_checkpointing_enable()


def allow_fp16_gradients(accelerator) -> None:
    """full_fp16: trainable weights are fp16, so the grad scaler must unscale fp16 gradients."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None:
        return
    original = scaler._unscale_grads_

    def unscale(optimizer, inv_scale, found_inf, allow_fp16):  # noqa: ARG001
        return original(optimizer, inv_scale, found_inf, True)

    scaler._unscale_grads_ = unscale


def offload_idle(parts, latents_cached: bool, text_cached: bool) -> list[str]:
    """Keep on the CPU what training no longer needs on the device once its outputs are cached: the VAE
    when latents are cached, frozen text encoders when their outputs are. Sampling brings them over and
    back. Returns the names moved."""
    moved = []
    if latents_cached:
        parts.vae.to("cpu")
        moved.append("vae")
    if text_cached:
        for name, encoder in parts.text_encoders.items():
            if not any(p.requires_grad for p in encoder.parameters()):
                encoder.to("cpu")
                moved.append(name)
    return moved


def peak_memory_text() -> str:
    """Peak device memory of this process, for the end-of-run summary."""
    import resource

    if torch.cuda.is_available():
        return f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated"
    return f"peak process memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (CPU)"
