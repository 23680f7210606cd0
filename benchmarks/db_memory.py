"""Device memory of a full fine-tune of the real SD1.5 U-Net (859.5M parameters): weights, gradients and
optimizer state, unfused AdamW vs fused-backward Adafactor, with fp32 and bf16 (full_bf16) weights.

    python benchmarks/db_memory.py

No GPU and no weights needed: the U-Net is built on PyTorch's meta device from the shipped architecture
config, and each optimizer really steps once on meta tensors, so the state counted is the state that
optimizer allocates (AdamW: two moments per element; transformers' Adafactor: row/column factors for
tensors of 2+ dims, full second moment for vectors). Gradients: all of them for the plain step; with the
fused backward pass, the largest single parameter's (tests/test_optim.py checks that only one is alive).
Activations are not included (they depend on batch, resolution and checkpointing: the memory planner).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 2**30


def optimizer_state_bytes(name: str, params: list[torch.nn.Parameter]) -> int:
    from library.optim import build_optimizer

    for p in params:
        p.grad = torch.empty_like(p)
    optimizer = build_optimizer(name, [{"params": params}], 1e-4, [])
    optimizer.step()
    total = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if torch.is_tensor(t))
    for p in params:
        p.grad = None
    return total


def main() -> None:
    from diffusers import UNet2DConditionModel

    from library.cli import quiet_libraries
    from library.loading import arch_dir

    quiet_libraries()

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        with torch.device("meta"):
            config = UNet2DConditionModel.load_config(str(arch_dir("sd15")), subfolder="unet")
            unet = UNet2DConditionModel.from_config(config).to(dtype)
        params = list(unet.parameters())
        weights = sum(p.numel() * p.element_size() for p in params)
        largest = max(p.numel() * p.element_size() for p in params)
        for label, optimizer, grads in (("AdamW", "AdamW", weights), ("Adafactor, fused backward", "Adafactor", largest)):
            state = optimizer_state_bytes(optimizer, params)
            rows.append((label, str(dtype).replace("torch.", ""), weights, grads, state))
    print(f"SD1.5 U-Net, {sum(p.numel() for p in params) / 1e6:.1f}M parameters (activations not included)\n")
    print("| optimizer | weights dtype | weights GiB | gradients GiB | optimizer state GiB | sum GiB |")
    print("|---|---|---|---|---|---|")
    for label, dtype, w, g, s in rows:
        print(f"| {label} | {dtype} | {w / GIB:.2f} | {g / GIB:.3f} | {s / GIB:.2f} | {(w + g + s) / GIB:.2f} |")


if __name__ == "__main__":
    main()
