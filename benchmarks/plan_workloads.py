"""Planned peak device memory of the headline workloads, batch 1, with the switches that get each one
lowest (the memory planner: fake tensors, full-size architectures, no GPU and no weights).

    python benchmarks/plan_workloads.py            # prints a markdown table (README: Speed and memory)

Goals (GB allocated at the peak, CUDA context on top): SD1.5 DreamBooth 4, SD1.5 LoRA 2, SDXL LoRA 5,
SDXL full 10, SD3-medium LoRA 6, FLUX.1-dev LoRA 6, FLUX.1-dev full 16. Workloads whose family or
architecture configs are not in the tree yet are listed as such.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GOALS = {"SD1.5 full DreamBooth 512px": 4, "SD1.5 LoRA 512px": 2, "SDXL LoRA 1024px": 5,
         "SDXL full fine-tune 1024px": 10, "SD3-medium LoRA 1024px": 6, "FLUX.1-dev LoRA 1024px": 6,
         "FLUX.1-dev full fine-tune 1024px": 16}
LORA = dict(recipe="network", mixed_precision="bf16", gradient_checkpointing=True, cache_latents=True,
            cache_text_encoder_outputs=True, train_text_encoder=False, optimizer_type="AdamW8bit")
FULL = dict(recipe="db", mixed_precision="bf16", full_bf16=True, gradient_checkpointing=True, cache_latents=True,
            cache_text_encoder_outputs=True, train_text_encoder=False, optimizer_type="Adafactor",
            fused_backward_pass=True)
T5_FP8 = {"t5xxl_precision": "fp8"}
WORKLOADS = [("SD1.5 full DreamBooth 512px", "sd1", "sd15", 512, FULL),
             ("SD1.5 LoRA 512px", "sd1", "sd15", 512, LORA),
             ("SDXL LoRA 1024px", "sdxl", "sdxl", 1024, {**LORA, "fp8_base": True}),
             ("SDXL full fine-tune 1024px", "sdxl", "sdxl", 1024, FULL),
             ("SD3-medium LoRA 1024px", "sd3", "sd3-medium", 1024, {**LORA, **T5_FP8}),
             ("FLUX.1-dev LoRA 1024px", "flux", "flux-dev", 1024,
              {**LORA, **T5_FP8, "fp8_base": True, "blocks_to_swap": 48}),
             # sd-scripts' 24 GB recipe: fused backward pass + Adafactor + full_bf16 + blocks_to_swap
             ("FLUX.1-dev full fine-tune 1024px", "flux", "flux-dev", 1024, {**FULL, **T5_FP8, "blocks_to_swap": 28})]
GIB = 2**30


def main() -> None:
    from library.cli import quiet_libraries
    from library.config import NetworkSection
    from library.loading import ARCH_ROOT
    from library.planner import plan, switch_text
    from library.planner.step import StepSettings

    quiet_libraries()
    only = sys.argv[1:]
    print("| workload | goal GB | planned peak GiB | training step | weights | trained weights | grads | optimizer state | "
          "activations | temporaries | VAE phase | text phase | switches | plan time |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, family, arch, size, switches in WORKLOADS:
        if only and not any(o.lower() in name.lower() for o in only):
            continue
        if not (ARCH_ROOT / arch).is_dir():
            print(f"| {name} | {GOALS[name]} | not yet: no library/arch/{arch} | | | | | | | | | | | |", flush=True)
            continue
        s = StepSettings(family=family, arch=arch, width=size, height=size, batch_size=1,
                         network=NetworkSection(network_dim=16, network_alpha=16), **switches)
        started = time.perf_counter()
        p = plan(s)
        b = {k: v / GIB for k, v in p.breakdown.items()}
        weights = b["weights"]
        trained = b["adapter weights"]
        print(f"| {name} | {GOALS[name]} | **{p.device_peak / GIB:.2f}** | {p.peak / GIB:.2f} | {weights:.2f} | {trained:.2f} | "
              f"{b['gradients']:.2f} | {b['optimizer state']:.2f} | {b['activations']:.2f} | {b['temporaries']:.2f} | "
              f"{p.vae_peak / GIB:.2f} | {p.text_peak / GIB:.2f} | {switch_text(s)}, dim 16 | "
              f"{time.perf_counter() - started:.0f}s |", flush=True)


if __name__ == "__main__":
    main()
