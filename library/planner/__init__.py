"""The memory planner: the peak device memory of a config's training step, by category, for the
full-size architecture the config names, without a GPU or weights (`--plan`); and the cheapest set of
memory switches that fits a budget (`--vram_budget GB`).

    python train_network.py --config x.toml --plan
    python train_db.py --config x.toml --vram_budget 8

How: library/planner/step.py runs the recipe's step on fake tensors (library/planner/tracker.py counts
every storage on the faked device); this module turns a config into that step, prints the result and
searches the switches.
"""
from __future__ import annotations

import dataclasses
import time

from library.planner.step import StepSettings, measure_step
from library.planner.tracker import CATEGORIES

GIB = 2**30


@dataclasses.dataclass
class Plan:
    settings: StepSettings
    peak: int  # bytes at the peak of the training step
    breakdown: dict[str, int]
    vae_peak: int
    text_peak: int
    notes: list[str]
    seconds: float
    trainable: int = 0

    @property
    def device_peak(self) -> int:
        """The largest of the training step and the pre-encoding phases."""
        return max(self.peak, self.vae_peak, self.text_peak)


def settings_from_config(cfg, recipe: str) -> StepSettings:
    from library.training import resolution

    m, t, o, d = cfg.model, cfg.train, cfg.optimizer, cfg.dataset
    family = m.family if m.family != "auto" else _guess_family(m.pretrained_model_name_or_path)
    arch = m.arch or {"sd1": "sd2" if m.v2 else "sd15", "sdxl": "sdxl", "sd3": "sd3-medium"}.get(family, family)
    width, height = resolution(d.resolution)
    n = cfg.network
    return StepSettings(
        recipe=recipe, family=family, arch=arch, width=width, height=height, batch_size=d.train_batch_size,
        mixed_precision=t.mixed_precision, full_fp16=t.full_fp16, full_bf16=t.full_bf16, no_half_vae=t.no_half_vae,
        gradient_checkpointing=t.gradient_checkpointing, sdpa=t.sdpa or t.xformers,
        cache_latents=d.cache_latents or d.cache_latents_to_disk,
        cache_text_encoder_outputs=t.cache_text_encoder_outputs or t.cache_text_encoder_outputs_to_disk,
        optimizer_type=o.optimizer_type, optimizer_args=list(o.optimizer_args), max_grad_norm=o.max_grad_norm,
        fused_backward_pass=o.fused_backward_pass, fused_optimizer_groups=o.fused_optimizer_groups,
        train_text_encoder=(cfg.dreambooth.train_text_encoder if recipe == "db" else not n.network_train_unet_only),
        train_unet=not n.network_train_text_encoder_only, clip_skip=m.clip_skip,
        v_parameterization=m.v_parameterization, network=n, learning_rate=o.learning_rate,
        fp8_base=t.fp8_base, blocks_to_swap=t.blocks_to_swap, cpu_offload_checkpointing=t.cpu_offload_checkpointing,
        t5xxl_precision=m.t5xxl_precision)


def _guess_family(path: str) -> str:
    from pathlib import Path

    from library.families import get_family

    if Path(path).exists():
        return get_family("auto", path).name
    return "sdxl" if "xl" in Path(path).name.lower() else "sd1"


def plan(settings: StepSettings, fake: bool = True) -> Plan:
    started = time.perf_counter()
    m = measure_step(settings, fake=fake)
    step = m.phases["step"]
    return Plan(settings, step.bytes, step.breakdown(m.tracker.records), m.phases["vae"].bytes,
                m.phases["text"].bytes, m.notes, time.perf_counter() - started, m.trainable)


def format_plan(p: Plan) -> str:
    s = p.settings
    lines = [f"memory plan: {s.arch} ({s.family}), {'full fine-tune' if s.recipe == 'db' else 'adapter'} training, "
             f"{s.width}x{s.height}, batch {s.batch_size}; {p.trainable:,} trainable parameters",
             f"  switches: {switch_text(s)}",
             f"  peak device memory of the training step: {p.peak / GIB:.2f} GiB"]
    for key in CATEGORIES:
        lines.append(f"    {key:<16} {p.breakdown.get(key, 0) / GIB:7.2f} GiB")
    vae_when = "before training (cache_latents)" if s.cache_latents else "inside every step (counted above)"
    text_when = ("before training (cache_text_encoder_outputs)" if s.cache_text_encoder_outputs
                 else "inside every step (counted above)")
    lines += [f"  pre-encoding phases: VAE latents {p.vae_peak / GIB:.2f} GiB ({vae_when}); "
              f"text encoders {p.text_peak / GIB:.2f} GiB ({text_when})",
              f"  device peak: {p.device_peak / GIB:.2f} GiB allocated (the CUDA context, ~0.3-0.5 GiB, comes on top)"]
    lines += [f"  note: {n}" for n in p.notes]
    lines.append(f"  (fake tensors, {2} optimizer steps, planned in {p.seconds:.0f}s; a faked device with CUDA's "
                 f"autocast policy and foreach optimizer kernels)")
    return "\n".join(lines)


def switch_text(s: StepSettings) -> str:
    on = [f"mixed_precision={s.mixed_precision}"]
    on += [name for name in ("full_fp16", "full_bf16", "gradient_checkpointing", "cache_latents",
                             "cache_text_encoder_outputs", "fused_backward_pass", "fp8_base",
                             "cpu_offload_checkpointing") if getattr(s, name)]
    if s.blocks_to_swap:
        on.append(f"blocks_to_swap={s.blocks_to_swap}")
    if s.t5xxl_precision != "auto":
        on.append(f"t5xxl_precision={s.t5xxl_precision}")
    if s.fused_optimizer_groups:
        on.append(f"fused_optimizer_groups={s.fused_optimizer_groups}")
    on.append(f"optimizer {s.optimizer_type}")
    if s.recipe == "db" and not s.train_text_encoder:
        on.append("text encoder frozen")
    if s.recipe == "network" and not s.train_text_encoder:
        on.append("denoiser only")
    return ", ".join(on)


# ---------------------------------------------------------------------------------------------
# --vram_budget: the switches, cheapest first
# ---------------------------------------------------------------------------------------------

# (name, what it changes, config lines, its cost in speed as far as known without a GPU)
def _ladder(s: StepSettings) -> list[tuple[str, dict, list[str], str]]:
    steps = []
    if s.mixed_precision == "no":
        steps.append(("bf16", {"mixed_precision": "bf16"}, ['mixed_precision = "bf16"   # [train]'],
                      "faster on any GPU since Ampere"))
    if not s.cache_latents:
        steps.append(("cache latents", {"cache_latents": True}, ["cache_latents = true   # [dataset]"],
                      "faster (no VAE per step); no random crop / color aug"))
    if not s.cache_text_encoder_outputs and (s.recipe == "db" or s.train_unet):
        frozen = {"cache_text_encoder_outputs": True, "train_text_encoder": False}
        lines = ["cache_text_encoder_outputs = true   # [train]",
                 "network_train_unet_only = true   # [network]" if s.recipe == "network"
                 else "train_text_encoder = false   # [dreambooth]"]
        steps.append(("frozen, cached text encoders", frozen, lines, "faster; the text encoder no longer trains"))
    if s.t5xxl_precision == "auto" and _has_t5(s):
        steps.append(("T5-XXL in fp8 while encoding", {"t5xxl_precision": "fp8"},
                      ['t5xxl_precision = "fp8"   # [model]'],
                      "encoding only (once, when cached); fp8 rounding of T5's weights"))
    if s.optimizer_type.lower() == "adamw" and s.recipe == "network":
        steps.append(("AdamW8bit", {"optimizer_type": "AdamW8bit"}, ['optimizer_type = "AdamW8bit"   # [optimizer]'],
                      "about the same speed"))
    if s.recipe == "db" and not s.fused_backward_pass:
        steps.append(("Adafactor, fused backward", {"optimizer_type": "Adafactor", "fused_backward_pass": True},
                      ['optimizer_type = "Adafactor"   # [optimizer]', "fused_backward_pass = true   # [optimizer]"],
                      "about the same speed; per-parameter clipping"))
    if not s.gradient_checkpointing:
        steps.append(("gradient checkpointing", {"gradient_checkpointing": True},
                      ["gradient_checkpointing = true   # [train]"], "~20-30% slower (forward recomputed)"))
    if s.recipe == "db" and not (s.full_bf16 or s.full_fp16):
        steps.append(("full_bf16", {"full_bf16": True, "mixed_precision": "bf16"},
                      ["full_bf16 = true   # [train]"], "same speed; bf16 weights lose small updates"))
    if s.recipe == "network" and s.train_unet and not s.fp8_base:
        change = {"fp8_base": True, **({"mixed_precision": "bf16"} if s.mixed_precision == "no" else {})}
        steps.append(("fp8_base", change, ["fp8_base = true   # [train]"],
                      "slightly slower (each layer's weights cast per use); fp8 rounding of the frozen base"))
    blocks = _swappable_block_sizes(s)
    if blocks and (s.recipe == "network" or s.fused_backward_pass or not s.fused_optimizer_groups):
        from library.block_swap import spread

        trained = s.recipe == "db"
        for count in [c for c in (*range(8, len(blocks), 8), len(blocks)) if c > s.blocks_to_swap]:
            per_weight = 1 if s.fp8_base else 4 if (trained and not (s.full_bf16 or s.full_fp16)) else 2
            moved = sum(blocks[k] for k in spread(len(blocks), count)) * per_weight
            seconds = (2 * moved + (moved if trained else 0)) / 25e9
            steps.append((f"blocks_to_swap {count}", {"blocks_to_swap": count},
                          [f"blocks_to_swap = {count}   # [train]"],
                          f"~{seconds:.1f} s/step of PCIe copies at 25 GB/s ({moved / GIB:.1f} GiB each way), "
                          f"partly hidden behind compute"))
    return steps


def _has_t5(s: StepSettings) -> bool:
    import json

    from library.loading import arch_dir

    configs = [p / "config.json" for p in arch_dir(s.arch).iterdir() if (p / "config.json").is_file()]
    return any("T5EncoderModel" in json.loads(c.read_text()).get("architectures", []) for c in configs)


def _swappable_block_sizes(s: StepSettings) -> list[int]:
    """Parameter counts of the family's swappable blocks (empty for families without block swap)."""
    from library.families import get_family
    from library.loading import arch_dir
    from library.planner.step import build_parts

    family = get_family(s.family, "")
    if not hasattr(family, "swappable_blocks"):
        return []
    import torch

    with torch.device("meta"):
        parts = build_parts(family, s.family, arch_dir(s.arch))
    return [sum(p.numel() for p in block.parameters()) for block in family.swappable_blocks(parts)]


def search_budget(s: StepSettings, budget_gb: float, say=print,
                  fake: bool = True) -> tuple[Plan, list[str], list[str]] | None:
    """Add switches, cheapest in speed first, until the planned device peak fits `budget_gb` (GiB);
    then lower the batch size. Returns (plan, config lines, costs) or None if nothing fits. fake=False
    plans with real tensors on the CPU (for models small enough: the tests)."""
    budget = budget_gb * GIB
    current, lines, costs = s, [], []
    p = plan(current, fake=fake)
    say(f"  as configured: {p.device_peak / GIB:.2f} GiB")
    ladder = _ladder(s)
    while p.device_peak > budget and ladder:
        name, change, add, cost = ladder.pop(0)
        current = dataclasses.replace(current, **change)
        keys = {line.split("=")[0].strip() for line in add}
        lines = [x for x in lines if x.split("=")[0].strip() not in keys] + add  # blocks_to_swap 8 -> 16: one line
        costs.append(f"{name}: {cost}")
        p = plan(current, fake=fake)
        say(f"  + {name}: {p.device_peak / GIB:.2f} GiB")
    while p.device_peak > budget and current.batch_size > 1:
        current = dataclasses.replace(current, batch_size=max(1, current.batch_size // 2))
        p = plan(current, fake=fake)
        lines = [x for x in lines if "train_batch_size" not in x] + [
            f"train_batch_size = {current.batch_size}   # [dataset]"]
        costs.append("smaller batch: fewer images per step")
        say(f"  batch {current.batch_size}: {p.device_peak / GIB:.2f} GiB")
    if p.device_peak > budget:
        return None
    return p, lines, costs


def run(cfg, recipe: str, budget_gb: float | None = None) -> int:
    """--plan / --vram_budget from a recipe's main(): print, and return the exit code."""
    s = settings_from_config(cfg, recipe)
    if budget_gb is None:
        print(format_plan(plan(s)), flush=True)
        return 0
    print(f"searching memory switches for a {budget_gb:g} GiB budget ({s.arch}, {s.width}x{s.height}):", flush=True)
    found = search_budget(s, budget_gb, say=lambda line: print(line, flush=True))
    if found is None:
        print(f"nothing fits in {budget_gb:g} GiB with the switches this trainer has", flush=True)
        return 1
    p, lines, costs = found
    print(format_plan(p))
    if lines:
        print("add to the config:\n    " + "\n    ".join(lines))
        print("cost: " + "; ".join(costs))
    else:
        print("fits as configured")
    return 0
