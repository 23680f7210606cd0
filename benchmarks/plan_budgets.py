"""--vram_budget for 8, 12, 16 and 24 GB, for the large DiTs' LoRA (the memory planner: fake tensors, full-size
architectures, no GPU and no weights): the switches the search adds and the planned card total, or, where
nothing reaches the budget, the smallest total it reached and the phase that stays over.

    python benchmarks/plan_budgets.py                 # prints a markdown table (README: Speed and memory)
    python benchmarks/plan_budgets.py klein zimage    # only the rows whose name has one of these words

Each search starts from the config a user of these models starts with: LoRA dim 16, batch 1, bf16, cached latents
and text-encoder outputs (the text encoder frozen), AdamW, no sampling during training (sampling's own prompts
are encoded on the card beside the training state: see the workload table). The search is
library/planner/budget.py's search_budget itself; plans shared by several budgets are computed once.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BUDGETS = (8, 12, 16, 24)
START = dict(recipe="network", mixed_precision="bf16", cache_latents=True, cache_text_encoder_outputs=True,
             train_text_encoder=False, optimizer_type="AdamW", batch_size=1)
MODELS = [("Chroma", "chroma", "chroma", 1024), ("FLUX.2 klein 4B", "flux2", "flux2-klein-4b", 1024),
          ("FLUX.2 klein 9B", "flux2", "flux2-klein-9b", 1024), ("FLUX.2 dev", "flux2", "flux2-dev", 1024),
          ("Qwen-Image", "qwen_image", "qwen-image", 1024), ("Qwen-Image", "qwen_image", "qwen-image", 1328),
          ("Z-Image", "zimage", "zimage", 1024), ("Anima", "anima", "anima", 1024)]
GIB = 2**30
# how a line of the search's config reads in the table
SHORT = {"t5xxl_precision": "TE", "optimizer_type": "", "gradient_checkpointing": "checkpointing",
         "fp8_base": "fp8_base", "blocks_to_swap": "swap"}


LAST = []  # the plans the current search made, in order (the last one is what it found, when it found one)


def memoized_plans():
    """library.planner.budget's plan(), each settings planned once (the searches for 8 .. 24 GB share prefixes)."""
    import library.planner.budget as budget

    plan, seen = budget.plan, {}

    def once(settings, **kwargs):
        key = repr(settings)
        if key not in seen:
            seen[key] = plan(settings, **kwargs)
        LAST.append(seen[key])
        return seen[key]

    budget.plan = once


def short(lines: list[str]) -> str:
    """'t5xxl_precision = "nf4"   # [model]' -> 'TE nf4', ..."""
    out = []
    for line in lines:
        key, value = (part.strip() for part in line.split("#")[0].split("=", 1))
        value = value.strip('"')
        name = SHORT.get(key, key)
        out.append(name if value == "true" else f"{name} {value}".strip())
    return ", ".join(out) or "as is"


def row(name: str, family: str, arch: str, size: int, budget_gb: int) -> str:
    from library.config import NetworkSection
    from library.planner.budget import search_budget
    from library.planner.card import margin
    from library.planner.step import StepSettings

    s = StepSettings(family=family, arch=arch, width=size, height=size,
                     network=NetworkSection(network_dim=16, network_alpha=16), **START)
    said: list[str] = []
    LAST.clear()
    found = search_budget(s, budget_gb, say=said.append)
    # found: the plan it ended on; else the smallest card total any rung reached (the quantized rungs, tried
    # last, drop block swap, so the last plan need not be the smallest)
    p = LAST[-1] if found is not None else min(LAST, key=lambda plan: plan.card_peak)
    worst = max(p.phases, key=p.card_total)
    phases = ", ".join(f"{k} {p.card_total(k) / GIB:.2f}" for k in ("text", "step") if k in p.phases)
    if found is not None:
        return f"| {name} {size} | {budget_gb} | {p.card_peak / GIB:.2f} | yes | {short(found[1])} | {phases} |"
    limit = (budget_gb * GIB - margin(budget_gb * GIB)) / GIB
    added = [line.split(":")[0].strip(" +") for line in said[1:]]
    return (f"| {name} {size} | {budget_gb} | {p.card_peak / GIB:.2f} | no: {worst} over {limit:.2f} | every "
            f"switch: {', '.join(added)} | {phases} |")


def main() -> None:
    from library.cli import quiet_libraries

    quiet_libraries()
    memoized_plans()
    only = [word.lower() for word in sys.argv[1:]]
    print("| model, px | budget GB | planned card total GiB | fits (budget less 5%) | switches the search adds | "
          "card GiB: captions, step |")
    print("|---|---|---|---|---|---|")
    started = time.perf_counter()
    for name, family, arch, size in MODELS:
        if only and not any(word in f"{name} {size} {arch}".lower() for word in only):
            continue
        for budget_gb in BUDGETS:
            print(row(name, family, arch, size, budget_gb), flush=True)
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
