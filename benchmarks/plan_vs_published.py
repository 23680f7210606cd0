"""The plan against VRAM figures others measured and published, with their settings translated into ours.

    python benchmarks/plan_vs_published.py            # every figure (a markdown table; minutes)
    python benchmarks/plan_vs_published.py flux        # the rows whose source or workload names "flux"
    python benchmarks/plan_vs_published.py 7 8 time    # rows 7 and 8, then the timing of a FLUX.1-dev plan

Kinds of figure, and the goal for each:
- allocated: torch.cuda.max_memory_allocated -> the plan's allocated peak within 10%;
- card: what the card showed (nvidia-smi, "uses N GB") -> the plan's card total (reserved + context) within 10%;
- fits: "works on an N GB card" -> the card total at most N. A lower bound only where the source's wording
  gives one, read per row (`band`): a ladder of recommendations names a lighter setting for the next smaller
  card (so this one needs more than that card: at least its size less the CUDA context), or "N GB minimum"
  (at least N less the context). "Less than N" / "under N" / "a single N GB GPU" bound it from above only.
A row names the source (URL, or repository and path at the commit read) and what of its settings we cannot
reproduce. The last line times a FLUX.1-dev plan of every phase on this machine.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 2**30
SD_SCRIPTS = "kohya-ss/sd-scripts README.md @ 884fc8c7^"
SD_SCRIPTS_DOC = "kohya-ss/sd-scripts docs/flux_train_network.md §6.1 @ 48d368fa"
DIFFUSERS = "huggingface/diffusers examples/"
SIMPLETUNER = "bghira/SimpleTuner documentation/quickstart/FLUX.md @ bc8e6ab7"
AI_TOOLKIT = "ostris/ai-toolkit FAQ.md + config/examples/train_lora_flux_24gb.yaml"

FLUX_LORA = dict(recipe="network", family="flux", arch="flux-dev", size=1024, mixed_precision="bf16",
                 gradient_checkpointing=True, cache_latents=True, cache_text_encoder_outputs=True,
                 train_text_encoder=False, optimizer_type="AdamW8bit", fp8_base=True, t5xxl_precision="fp8", dim=4)
FLUX_FULL = dict(recipe="db", family="flux", arch="flux-dev", size=1024, mixed_precision="bf16", full_bf16=True,
                 gradient_checkpointing=True, cache_latents=True, cache_text_encoder_outputs=True,
                 train_text_encoder=False, optimizer_type="Adafactor", fused_backward_pass=True, max_grad_norm=0.0)
# (sd-scripts' fine-tuning command caches the outputs of t5xxl_fp16: T5 in 16 bits)
SD1_DB = dict(recipe="db", family="sd1", arch="sd15", size=512, mixed_precision="no", gradient_checkpointing=True,
              train_text_encoder=False, optimizer_type="AdamW8bit", batch_size=2)


@dataclass
class Figure:
    source: str
    what: str  # the published setting, in its words
    kind: str  # allocated / card / fits
    gb: float
    settings: dict
    unreproduced: str = ""  # what of the source's settings we lack or approximate
    phase: str = ""  # compare one phase ("text") instead of the whole run
    extra: dict = field(default_factory=dict)
    band: tuple = (0, None)  # fits: the card total (GB) the wording supports, (at least, at most); None: gb
    reading: str = "fits N: at most N"  # how the figure is read

    @property
    def bounds(self) -> tuple[float, float]:
        return self.band[0], self.band[1] if self.band[1] is not None else self.gb


FIGURES = [
    Figure(SD_SCRIPTS, "FLUX.1 LoRA dim 4, fp8_base, AdamW8bit, batch 2, 1024px, cached latents + TE outputs",
           "fits", 24, {**FLUX_LORA, "batch_size": 2}, band=(16, 24),
           reading="a ladder: 16 GB is given batch 1, so 16-24"),
    Figure(SD_SCRIPTS, "the same, batch 1 (\"and use blocks_to_swap\")", "fits", 16, FLUX_LORA,
           "the swap count is not given: planned without swap", band=(16, 24),
           reading="16 GB needs some swap: without it, 16-24"),
    Figure(SD_SCRIPTS, "the same, batch 1, blocks_to_swap 16", "fits", 12, {**FLUX_LORA, "blocks_to_swap": 16},
           band=(10, 12), reading="a ladder: 10 GB is given swap 22, so 10-12"),
    Figure(SD_SCRIPTS, "the same, fp8 T5-XXL, blocks_to_swap 22", "fits", 10, {**FLUX_LORA, "blocks_to_swap": 22},
           band=(8, 10), reading="a ladder: 8 GB is given swap 28, so 8-10"),
    Figure(SD_SCRIPTS, "the same, fp8 T5-XXL, blocks_to_swap 28", "fits", 8, {**FLUX_LORA, "blocks_to_swap": 28},
           reading="the ladder's last rung: at most 8"),
    Figure(SD_SCRIPTS_DOC, "FLUX.1 LoRA, fp8_base, 8bit AdamW, blocks_to_swap 16 (table)", "fits", 12,
           {**FLUX_LORA, "blocks_to_swap": 16}, band=(10, 12), reading="a ladder: 10 GB is given swap 22, so 10-12"),
    Figure(SD_SCRIPTS, "FLUX.1 fine-tune, Adafactor, fused_backward_pass, full_bf16, blocks_to_swap 8, batch 1",
           "fits", 24, {**FLUX_FULL, "blocks_to_swap": 8}, "stochastic rounding (no memory)", band=(12, 24),
           reading="\"a good starting point for 24GB\"; 12 GB is given swap 28, so 12-24"),
    Figure(SD_SCRIPTS, "FLUX.1 fine-tune, blocks_to_swap 28 (\"may be working with 12GB\")", "fits", 12,
           {**FLUX_FULL, "blocks_to_swap": 28}, band=(10, 12),
           reading="at most 12; \"10GB of VRAM will be minimum\" (T5-XXL), so 10-12"),
    Figure(SD_SCRIPTS, "SD3.5-large LoRA dim 4, fp8_base, AdamW8bit, batch 2, 1024px, cached", "fits", 16,
           {**FLUX_LORA, "family": "sd3", "arch": "sd3.5-large", "batch_size": 2},
           reading="no smaller card named: at most 16"),
    Figure(SD_SCRIPTS, "sdxl_train.py fused_backward_pass, Adafactor, fp32, batch 1 (\"about 17GB\")", "card", 17,
           dict(recipe="db", family="sdxl", arch="sdxl", size=1024, mixed_precision="no", gradient_checkpointing=True,
                train_text_encoder=False, optimizer_type="Adafactor", fused_backward_pass=True),
           "not stated, so sdxl_train.py's defaults: nothing cached (VAE and both text encoders on the GPU, fp32), "
           "U-Net only; 1024px and gradient checkpointing assumed; kind of figure not stated (read as the card)",
           reading="about 17: the card total within 10%"),
    Figure(DIFFUSERS + "dreambooth/README.md", "SD1.4 DreamBooth 512px, prior preservation (batch 1+1), gradient "
           "checkpointing, 8-bit Adam, fp32", "fits", 16, SD1_DB, "SD1.4 planned as SD1.5 (same architecture); the "
           "attention of diffusers then (no xformers: not memory-efficient) planned as SDPA",
           reading="at most 16 (the lower bound, 12 GB needing xformers, is about an attention we do not plan)"),
    Figure(DIFFUSERS + "dreambooth/README.md", "the same + xformers + set_grads_to_none", "fits", 12, SD1_DB,
           "xformers planned as SDPA (both memory-efficient attention)", band=(8, 12),
           reading="a ladder: 8 GB is given DeepSpeed offloading, so 8-12"),
    Figure(DIFFUSERS + "dreambooth/README_sdxl.md", "SDXL DreamBooth LoRA rank 4, fp16, 1024px, batch 1, gradient "
           "checkpointing, 8-bit Adam, xformers (\"less than 16GB\")", "fits", 16,
           dict(recipe="network", family="sdxl", arch="sdxl", size=1024, mixed_precision="fp16",
                gradient_checkpointing=True, train_text_encoder=False, optimizer_type="AdamW8bit", dim=4),
           "latents not cached (the script encodes each step), fp16-fix VAE (same size)",
           reading="\"less than 16GB\": at most 16"),
    Figure(DIFFUSERS + "text_to_image/README.md", "SD1.4 full fine-tune 512px, fp16 mixed, gradient checkpointing, "
           "AdamW, EMA (\"a single 24GB GPU\")", "fits", 24,
           dict(recipe="db", family="sd1", arch="sd15", size=512, mixed_precision="fp16", gradient_checkpointing=True,
                train_text_encoder=False, optimizer_type="AdamW"),
           "EMA copy of the U-Net on the GPU (fp32, 3.2 GiB) not planned",
           reading="\"a single 24GB GPU\": at most 24"),
    Figure(DIFFUSERS + "research_projects/sd3_lora_colab/README.md", "SD3-medium DreamBooth LoRA rank 4, fp16, "
           "1024px, batch 1, gradient checkpointing, 8-bit Adam, embeddings precomputed (\"under 16GB\")", "fits", 16,
           dict(recipe="network", family="sd3", arch="sd3-medium", size=1024, mixed_precision="fp16",
                gradient_checkpointing=True, cache_latents=False, cache_text_encoder_outputs=True,
                train_text_encoder=False, optimizer_type="AdamW8bit", dim=4),
           reading="\"under 16GB\": at most 16"),
    Figure(DIFFUSERS + "research_projects/sd3_lora_colab/README.md", "SD3 text embeddings, the three encoders in "
           "FP16 (\"we are down to 12GB\")", "card", 12,
           dict(recipe="network", family="sd3", arch="sd3-medium", size=1024, mixed_precision="fp16",
                gradient_checkpointing=True, cache_latents=True, train_text_encoder=False,
                optimizer_type="AdamW8bit", dim=4), "the encoders resident together, as the pipeline holds them",
           phase="text", reading="\"down to 12GB\": the card total within 10%"),
    Figure(SIMPLETUNER, "FLUX.1 rank-16 LoRA, all components, bf16 base (\"a bit more than 30G\")", "card", 30,
           {**FLUX_LORA, "fp8_base": False, "dim": 16, "optimizer_type": "AdamW"},
           "SimpleTuner's adamw_bf16 planned as AdamW; resolution not stated (1024px assumed)",
           reading="a bit more than 30: the card total within 10%"),
    Figure(SIMPLETUNER, "the same, base quantised to int8 (\"a bit more than 18G\")", "card", 18,
           {**FLUX_LORA, "dim": 16, "optimizer_type": "AdamW"},
           "int8-quanto planned as fp8_base (1 byte per weight either way)",
           reading="a bit more than 18: the card total within 10%"),
    Figure(AI_TOOLKIT, "FLUX.1 LoRA rank 16, 8-bit base, adamw8bit, bf16, batch 1, 1024px (\"24GB minimum\")",
           "fits", 24, {**FLUX_LORA, "dim": 16, "cache_text_encoder_outputs": False, "sample": True,
                        "bucket_areas": (768**2 / 1024**2, 512**2 / 1024**2)},
           "text encoders resident (not cached), T5 in 8 bits (as fp8); buckets 512/768/1024 and sampling at "
           "1024px planned; the LoRA's EMA (~0.3 GiB) not planned", band=(24, 24),
           reading="\"24GB minimum\": 24 less the context to 24"),
    Figure(SD_SCRIPTS, "FLUX.1 fine-tune: \"T5XXL requires about 10GB of VRAM\" (t5xxl_fp16, caching outputs)",
           "card", 10, {**FLUX_FULL, "blocks_to_swap": 28}, phase="text",
           reading="about 10: the card total within 10%"),
]


def settings_of(f: Figure):
    from library.config import NetworkSection
    from library.planner.step import StepSettings

    s = dict(f.settings)
    size, dim = s.pop("size"), s.pop("dim", 4)
    return StepSettings(width=size, height=size, network=NetworkSection(network_dim=dim, network_alpha=dim), **s)


def compare(f: Figure, p) -> tuple[float, float, str]:
    """(planned GiB, ratio to the figure, in goal?)"""
    if f.phase:
        planned = p.card_total(f.phase) if f.kind != "allocated" else p.phases[f.phase].allocated
    else:
        planned = p.card_peak if f.kind != "allocated" else max(m.allocated for m in p.phases.values())
    planned /= GIB
    ratio = planned / f.gb
    if f.kind == "fits":
        low, high = f.bounds
        ok = low - p.card.context / GIB <= planned <= high
    else:
        ok = abs(ratio - 1) <= 0.10
    return planned, ratio, "yes" if ok else "**no**"


def main() -> None:
    from library.cli import quiet_libraries
    from library.planner import plan, switch_text

    quiet_libraries()
    only = [a.lower() for a in sys.argv[1:]]
    print("| # | source | published setting | kind | published GB | read as | our settings | planned GiB (card total "
          "unless allocated) | ratio | in goal | not reproduced | plan s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for i, f in enumerate(FIGURES, 1):
        if only and not any(o == str(i) if o.isdigit() else o in (f.source + f.what).lower() for o in only):
            continue
        s = settings_of(f)
        started = time.perf_counter()
        p = plan(s)
        planned, ratio, ok = compare(f, p)
        kind = f.kind + (f" ({f.phase} phase)" if f.phase else "")
        print(f"| {i} | {f.source} | {f.what} | {kind} | {f.gb:g} | {f.reading} | {switch_text(s)}, dim "
              f"{s.network.network_dim} "
              f"| {planned:.2f} | {ratio:.2f} | {ok} | {f.unreproduced} | {time.perf_counter() - started:.0f} |",
              flush=True)
    if not only or "time" in only:
        time_flux_plan()


def time_flux_plan() -> None:
    """The speed goal: a FLUX.1-dev plan of all phases, sampling included (CPU seconds: on a shared machine wall
    time is not this code's)."""
    from library.planner import plan

    s = dataclasses.replace(settings_of(FIGURES[1]), sample=True)
    wall, cpu = time.perf_counter(), time.process_time()
    p = plan(s)
    print(f"\nFLUX.1-dev LoRA plan of phases {', '.join(p.phases)}: {time.process_time() - cpu:.1f} s CPU, "
          f"{time.perf_counter() - wall:.1f} s wall")


if __name__ == "__main__":
    main()
