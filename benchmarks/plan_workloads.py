"""Planned card totals of the headline workloads, batch 1, sampling during training included (samples decoded
in tiles: sample_tiled_vae), with the switches that get each one lowest (the memory planner: fake tensors, full-size architectures, no GPU and no
weights; the caching-allocator model and a 0.5 GiB CUDA context).

    python benchmarks/plan_workloads.py            # prints a markdown table (README: Speed and memory)

Goals (GiB on the card: reserved + CUDA context, at the worst phase): SD1.5 DreamBooth 4, SD1.5 LoRA 3,
SDXL LoRA 6, SDXL full 10, SD3-medium LoRA 8, FLUX.1-dev LoRA 8, FLUX.1-dev full 16, Chroma LoRA 8, FLUX.2 klein
4B LoRA 8, klein 9B LoRA 12, dev LoRA 24, Qwen-Image LoRA 24 (1024 and 1328 px), Z-Image LoRA 12,
Anima LoRA 8; a row says whether the
card total is within the goal less --vram_budget's margin.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GOALS = {"SD1.5 full DreamBooth 512px": 4, "SD1.5 LoRA 512px": 3, "SDXL LoRA 1024px": 6,
         "SDXL full fine-tune 1024px": 10, "SD3-medium LoRA 1024px": 8, "SD3-medium LoRA 1024px, nf4 base": 8,
         "FLUX.1-dev LoRA 1024px": 8,
         "FLUX.1-dev full fine-tune 1024px": 16, "Chroma LoRA 1024px": 8, "FLUX.2 klein 4B LoRA 1024px": 8,
         "FLUX.2 klein 9B LoRA 1024px": 12, "FLUX.2 dev LoRA 1024px": 24,
         "Qwen-Image LoRA 1024px": 24, "Qwen-Image LoRA 1328px": 24, "Z-Image LoRA 1024px": 12,
         "Anima LoRA 1024px": 8}
LORA = dict(recipe="network", mixed_precision="bf16", gradient_checkpointing=True, cache_latents=True,
            cache_text_encoder_outputs=True, train_text_encoder=False, optimizer_type="AdamW8bit", sample_tiled_vae=True)
FULL = dict(recipe="db", mixed_precision="bf16", full_bf16=True, gradient_checkpointing=True, cache_latents=True,
            cache_text_encoder_outputs=True, train_text_encoder=False, optimizer_type="Adafactor",
            fused_backward_pass=True, sample_tiled_vae=True)
T5_FP8 = {"t5xxl_precision": "fp8"}
TE_NF4 = {"t5xxl_precision": "nf4"}  # the large text encoder in bitsandbytes nf4 while it encodes
WORKLOADS = [("SD1.5 full DreamBooth 512px", "sd1", "sd15", 512, {**FULL, "offload_optimizer_state": True}),
             ("SD1.5 LoRA 512px", "sd1", "sd15", 512, LORA),
             ("SDXL LoRA 1024px", "sdxl", "sdxl", 1024, {**LORA, "fp8_base": True}),
             ("SDXL full fine-tune 1024px", "sdxl", "sdxl", 1024, FULL),
             ("SD3-medium LoRA 1024px", "sd3", "sd3-medium", 1024, {**LORA, **T5_FP8}),
             ("SD3-medium LoRA 1024px, nf4 base", "sd3", "sd3-medium", 1024,
              {**LORA, **T5_FP8, "base_model_precision": "nf4"}),
             ("FLUX.1-dev LoRA 1024px", "flux", "flux-dev", 1024,
              {**LORA, **T5_FP8, "fp8_base": True, "blocks_to_swap": 38}),
             # sd-scripts' 24 GB recipe: fused backward pass + Adafactor + full_bf16 + blocks_to_swap
             ("FLUX.1-dev full fine-tune 1024px", "flux", "flux-dev", 1024, {**FULL, **T5_FP8, "blocks_to_swap": 28}),
             ("Chroma LoRA 1024px", "chroma", "chroma", 1024,
              {**LORA, **T5_FP8, "fp8_base": True, "blocks_to_swap": 44}),
             # FLUX.2: t5xxl_precision fp8 stores its Qwen3 / Mistral text encoder in fp8 too
             ("FLUX.2 klein 4B LoRA 1024px", "flux2", "flux2-klein-4b", 1024,
              {**LORA, **T5_FP8, "fp8_base": True, "blocks_to_swap": 4}),
             ("FLUX.2 klein 9B LoRA 1024px", "flux2", "flux2-klein-9b", 1024,
              {**LORA, **T5_FP8, "fp8_base": True, "blocks_to_swap": 16}),
             ("FLUX.2 dev LoRA 1024px", "flux2", "flux2-dev", 1024,
              {**LORA, **TE_NF4, "fp8_base": True, "blocks_to_swap": 48}),
             # musubi-tuner's 24 GB recipe for Qwen-Image: fp8 base + block swap (of 60 blocks)
             ("Qwen-Image LoRA 1024px", "qwen_image", "qwen-image", 1024, {**LORA, **TE_NF4, "fp8_base": True,
                                                                           "blocks_to_swap": 16}),
             ("Qwen-Image LoRA 1328px", "qwen_image", "qwen-image", 1328, {**LORA, **TE_NF4, "fp8_base": True,
                                                                           "blocks_to_swap": 16}),
             ("Z-Image LoRA 1024px", "zimage", "zimage", 1024, {**LORA, **T5_FP8, "fp8_base": True}),
             ("Anima LoRA 1024px", "anima", "anima", 1024, {**LORA, "fp8_base": True})]
GIB = 2**30


def main() -> None:
    from library.cli import quiet_libraries
    from library.config import NetworkSection
    from library.loading import ARCH_ROOT
    from library.planner import plan, switch_text
    from library.planner.step import StepSettings

    quiet_libraries()
    only = sys.argv[1:]
    from library.planner.card import margin

    print("| workload | goal GiB | card total GiB | fits goal less margin | phase | training step: allocated / "
          "reserved | VAE | text | sampling | weights | trained | grads | state | activations | host RAM GiB | "
          "switches | plan s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, family, arch, size, switches in WORKLOADS:
        if only and not any(o.lower() in name.lower() for o in only):
            continue
        if not (ARCH_ROOT / arch).is_dir():
            print(f"| {name} | {GOALS[name]} | not yet: no library/arch/{arch} |" + " |" * 14, flush=True)
            continue
        s = StepSettings(family=family, arch=arch, width=size, height=size, batch_size=1, sample=True,
                         network=NetworkSection(network_dim=16, network_alpha=16), **switches)
        started = time.perf_counter()
        p = plan(s)
        b = {k: v / GIB for k, v in p.breakdown.items()}
        worst = max(p.phases, key=p.card_total)
        limit = GOALS[name] * GIB - margin(GOALS[name] * GIB)
        cards = {k: f"{p.card_total(k) / GIB:.2f}" for k in p.phases}
        step = p.phases["step"]
        print(f"| {name} | {GOALS[name]} | **{p.card_peak / GIB:.2f}** | {'yes' if p.card_peak <= limit else 'no'} "
              f"| {worst} | {step.allocated / GIB:.2f} / {step.reserved / GIB:.2f} | {cards.get('vae', '')} | "
              f"{cards.get('text', '')} | {cards.get('sample', '')} | {b['weights']:.2f} | {b['adapter weights']:.2f} | "
              f"{b['gradients']:.2f} | {b['optimizer state']:.2f} | {b['activations']:.2f} | "
              f"{sum(p.host.values()) / GIB:.1f} | {switch_text(s)}, dim 16 | {time.perf_counter() - started:.0f} |",
              flush=True)

if __name__ == "__main__":
    main()
