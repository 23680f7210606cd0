"""--vram_budget: the memory switches, cheapest in speed first, added until the plan's card total fits the
budget less its margin (library/planner/card.py); then a smaller batch."""
from __future__ import annotations

import dataclasses

from library.planner.card import Card, margin
from library.planner.plan import GIB, Plan, plan
from library.planner.step import StepSettings


# ---------------------------------------------------------------------------------------------
# --vram_budget: the switches, cheapest first
# ---------------------------------------------------------------------------------------------

TEXT_NF4 = "text encoder in nf4 while encoding"


# (name, what it changes, config lines, its cost in speed as far as known without a GPU)
def _ladder(s: StepSettings, card: Card | None = None) -> list[tuple[str, dict, list[str], str]]:
    half = "bf16" if (card or Card()).bf16 else "fp16"  # a card without bf16 (before Ampere) gets fp16
    steps = []
    if s.mixed_precision == "no":
        steps.append((half, {"mixed_precision": half}, [f'mixed_precision = "{half}"   # [train]'],
                      "faster on any GPU with tensor cores"))
    if not s.cache_latents:
        steps.append(("cache latents", {"cache_latents": True}, ["cache_latents = true   # [dataset]"],
                      "faster (no VAE per step); no random crop / color aug"))
    if s.sample and not s.sample_tiled_vae:
        steps.append(("samples decoded in tiles", {"sample_tiled_vae": True}, ["sample_tiled_vae = true   # [sample]"],
                      "sampling only: a little slower decoding, faint seams possible in the sample images"))
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
    if s.t5xxl_precision != "nf4" and _has_t5(s):  # search_budget takes it only when the captions do not fit
        steps.append((TEXT_NF4, {"t5xxl_precision": "nf4"}, ['t5xxl_precision = "nf4"   # [model]'],
                      "encoding only (once, when cached); NF4 rounding of the text encoder's weights"))
    if s.optimizer_type.lower() == "adamw" and s.recipe == "network":
        steps.append(("AdamW8bit", {"optimizer_type": "AdamW8bit"}, ['optimizer_type = "AdamW8bit"   # [optimizer]'],
                      "about the same speed"))
    fp16 = s.mixed_precision == "fp16" or (s.mixed_precision == "no" and half == "fp16")
    if s.recipe == "db" and not s.fused_backward_pass and (s.full_fp16 or not fp16):  # no per-tensor unscaling
        steps.append(("Adafactor, fused backward", {"optimizer_type": "Adafactor", "fused_backward_pass": True},
                      ['optimizer_type = "Adafactor"   # [optimizer]', "fused_backward_pass = true   # [optimizer]"],
                      "about the same speed; per-parameter clipping"))
    if not s.gradient_checkpointing:
        steps.append(("gradient checkpointing", {"gradient_checkpointing": True},
                      ["gradient_checkpointing = true   # [train]"], "~20-30% slower (forward recomputed)"))
    if s.recipe == "db" and not (s.full_bf16 or s.full_fp16) and half == "bf16":  # full_fp16 would overflow
        steps.append(("full_bf16", {"full_bf16": True, "mixed_precision": "bf16"},
                      ["full_bf16 = true   # [train]"], "same speed; bf16 weights lose small updates"))
    fused = s.fused or (s.recipe == "db" and (s.full_fp16 or not fp16))  # as is, or from the rung above
    if s.recipe == "db" and fused and not s.offload_optimizer_state:
        steps.append(("optimizer state in CPU memory", {"offload_optimizer_state": True},
                      ["offload_optimizer_state = true   # [optimizer]"],
                      "each weight's state over PCIe and back at its step (2 x the state a step, the copy back "
                      "overlapped with backward); host RAM for the state"))
    if s.recipe == "network" and s.train_unet and not s.fp8_base:
        change = {"fp8_base": True, **({"mixed_precision": half} if s.mixed_precision == "no" else {})}
        steps.append(("fp8_base", change, ["fp8_base = true   # [train]"],
                      "slightly slower (each layer's weights cast per use); fp8 rounding of the frozen base"))
    swap_counts = _swap_counts(s)
    if swap_counts and (s.recipe == "network" or s.fused_backward_pass or not s.fused_optimizer_groups):
        trained = s.recipe == "db"
        per_weight = 1 if s.fp8_base else 4 if (trained and not (s.full_bf16 or s.full_fp16)) else 2
        for count, params in swap_counts.items():
            if count <= s.blocks_to_swap:
                continue
            moved = params * per_weight
            seconds = (2 * moved + (moved if trained else 0)) / 25e9
            steps.append((f"blocks_to_swap {count}", {"blocks_to_swap": count},
                          [f"blocks_to_swap = {count}   # [train]"],
                          f"~{seconds:.1f} s/step of PCIe copies at 25 GB/s ({moved / GIB:.1f} GiB each way), "
                          f"partly hidden behind compute"))
    steps += _quantized_base(s)
    return steps


def _quantized_base(s: StepSettings) -> list[tuple[str, dict, list[str], str]]:
    """Adapter recipes, when fp8_base and block swap are not enough: the frozen base through bitsandbytes, int8
    then nf4, instead of fp8_base (which it cannot go with) and without block swap (which it can go with, but a
    quantized base is tried as the faster alternative to swapping; config_checks refuses the adapters that read the
    base layer's weight). Full fine-tunes train the base: not offered."""
    from library.config_checks import QUANTIZED_BASE_REFUSED, _adapter_algo

    if s.recipe != "network" or not s.train_unet or s.base_model_precision != "no_change":
        return []
    steps = []
    for precision, size in (("int8", "~1 byte"), ("nf4", "~0.52 byte")):
        if s.network is not None and _adapter_algo(s.network) in QUANTIZED_BASE_REFUSED[precision]:
            continue
        lines = [f'base_model_precision = "{precision}"   # [model]']
        lines += ["fp8_base = false   # [train]"] * s.fp8_base
        lines += ["blocks_to_swap = 0   # [train]"] * bool(s.blocks_to_swap)
        steps.append((f"base_model_precision {precision}", {"base_model_precision": precision, "fp8_base": False,
                                                             "blocks_to_swap": 0}, lines,
                      f"frozen Linear weights {size} each, dequantized per use (slower than fp8_base); "
                      f"quantization error in the frozen base"))
    return steps


def _encoding_fits(p: Plan, limit: float) -> bool:
    """The phases the text encoder is on the card for (encoding the captions, and sampling's prompts) fit."""
    return all(p.card_total(phase) <= limit for phase in ("text", "sample") if phase in p.phases)


def _has_t5(s: StepSettings) -> bool:
    """The architecture has a text encoder t5xxl_precision applies to (T5, or FLUX.2's language model)."""
    import json

    from library.loading import arch_dir

    from library.quantization import LANGUAGE_MODELS  # FLUX.2's text encoders: t5xxl_precision stores them too

    configs = [p / "config.json" for p in arch_dir(s.arch).iterdir() if (p / "config.json").is_file()]
    stored_smaller = ("T5EncoderModel", *LANGUAGE_MODELS)
    return any(a in stored_smaller for c in configs for a in json.loads(c.read_text()).get("architectures", []))


def _swap_counts(s: StepSettings, stride: int = 8) -> dict[int, int]:
    """blocks_to_swap values the search tries (every `stride`, then the least that swaps every block) ->
    parameters they keep on the host; empty for families without block swap."""
    from accelerate import init_empty_weights

    from library.families import get_family
    from library.loading import arch_dir

    family = get_family(s.family, "")
    with init_empty_weights():  # parameters on the meta device; buffers real (SDXL's are built from data)
        parts = family.planning_parts(arch_dir(s.arch))
    total = len(family.swappable_blocks(parts))
    if not total:
        return {}
    every = next(c for c in range(1, 2 * total + 1) if len(family.blocks_to_swap(parts, c)) == total)
    return {c: sum(p.numel() for b in family.blocks_to_swap(parts, c) for p in b.parameters())
            for c in (*range(stride, every, stride), every)}


def search_budget(s: StepSettings, budget_gb: float, say=print, fake: bool = True,
                  card: Card | None = None) -> tuple[Plan, list[str], list[str]] | None:
    """Add switches, cheapest in speed first, until the planned card total (reserved + CUDA context) fits
    `budget_gb` GiB less the margin (the text encoder in nf4 only while encoding the captions is over it, else
    after the others); then lower the batch size. Only switches the card supports are proposed
    (no bf16 on a card without it). Returns (plan, config lines, costs) or None if nothing fits. fake=False
    plans with real tensors on the CPU (for models small enough: the tests)."""
    card = card or Card()
    budget = budget_gb * GIB
    limit = budget - margin(budget)
    current, lines, costs = s, [], []
    p = plan(current, fake=fake, card=card)
    say(f"  as configured: {p.card_peak / GIB:.2f} GiB on the card (fits: {limit / GIB:.2f} GiB, the budget less "
        f"{margin(budget) / GIB:.2f} GiB margin)")
    ladder = _ladder(s, card)
    while p.card_peak > limit and ladder:
        name, change, add, cost = step = ladder.pop(0)
        if name == TEXT_NF4 and _encoding_fits(p, limit):  # the captions fit: 4 bits only once they do not
            ladder += [step] if ladder else []
            continue
        current = dataclasses.replace(current, **change)
        back = {key for key, value in change.items() if getattr(s, key) == value}  # what the search set, undone
        keys = {line.split("=")[0].strip() for line in add} | back
        lines = [x for x in lines if x.split("=")[0].strip() not in keys] + add  # blocks_to_swap 8 -> 16: one line
        costs.append(f"{name}: {cost}")
        p = plan(current, fake=fake, card=card)
        say(f"  + {name}: {p.card_peak / GIB:.2f} GiB")
    while p.card_peak > limit and current.batch_size > 1:
        current = dataclasses.replace(current, batch_size=max(1, current.batch_size // 2))
        p = plan(current, fake=fake, card=card)
        lines = [x for x in lines if "train_batch_size" not in x] + [
            f"train_batch_size = {current.batch_size}   # [dataset]"]
        costs.append("smaller batch: fewer images per step")
        say(f"  batch {current.batch_size}: {p.card_peak / GIB:.2f} GiB")
    if p.card_peak > limit:
        return None
    return p, lines, costs
