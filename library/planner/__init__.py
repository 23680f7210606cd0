"""The memory planner: what a config's run will show on the card, phase by phase (class images, VAE caching, text
encoding, the training step, sampling, saving): allocated, reserved and the card total (reserved + CUDA context), by
category, for the full-size architecture the config names, without a GPU, weights or data (`--plan`); and the
cheapest set of memory switches whose card total fits a budget less a margin (`--vram_budget GB`, or the
present card's memory when a plan does not fit it).

    python train_network.py --config x.toml --plan
    python train_db.py --config x.toml --vram_budget 8

How: step.py runs the recipe's setup and step on fake tensors (tracker.py counts every storage on the faked
device), allocator.py replays those allocations through a model of PyTorch's caching allocator, card.py adds
what the card holds besides, architecture.py tells the model from the config, budget.py searches the
switches; this module turns a config into settings and prints.
"""
from __future__ import annotations


from library.planner.architecture import resolve
from library.planner.budget import search_budget
from library.planner.card import margin
from library.planner.plan import GIB, SAVING, Plan, plan
from library.planner.step import StepSettings
from library.planner.tracker import CATEGORIES


def settings_from_config(cfg, recipe: str) -> StepSettings:
    """The plan's settings: the run's own switches and optimizer settings as library/run.py reads them from the
    config (xformers planned as SDPA), and what the step is made of; per GPU for the processes the environment
    names (WORLD_SIZE, as accelerate launch sets it; `WORLD_SIZE=4 python train_db.py --config x.toml --plan`
    plans one of 4 under DDP; with ACCELERATE_USE_FSDP=true FSDP_VERSION=2, or ACCELERATE_USE_DEEPSPEED=true
    ACCELERATE_DEEPSPEED_ZERO_STAGE=3, one of 4 under FSDP2 / ZeRO-3: library/planner/sharding.py)."""
    import dataclasses

    from library.engines import launched_processes
    from library.planner.sharding import launched_sharding
    from library.run import OptimizerSettings, Switches
    from library.training import resolution

    m, t, d, db = cfg.model, cfg.train, cfg.dataset, cfg.dreambooth
    family, arch = resolve(m)
    width, height = resolution(d.resolution)
    n = cfg.network
    switches = dataclasses.replace(Switches.from_config(cfg), xformers=False, sdpa=t.sdpa or t.xformers)
    sharding = launched_sharding()  # ZeRO / FSDP2: one GPU of N, the step measured for one process
    return StepSettings(
        **dataclasses.asdict(switches), **dataclasses.asdict(OptimizerSettings.from_config(cfg)),
        recipe=recipe, family=family, arch=arch, width=width, height=height, batch_size=d.train_batch_size,
        cache_latents=d.cache_latents or d.cache_latents_to_disk,
        cache_text_encoder_outputs=t.cache_text_encoder_outputs or t.cache_text_encoder_outputs_to_disk,
        train_text_encoder=(cfg.dreambooth.train_text_encoder if recipe == "db" else not n.network_train_unet_only),
        train_unet=not n.network_train_text_encoder_only, clip_skip=m.clip_skip,
        v_parameterization=m.v_parameterization, network=n, bucket_areas=bucket_areas(d, (width, height)),
        sample=bool(cfg.sample.sample_prompts), sample_tiled_vae=cfg.sample.sample_tiled_vae,
        ema=recipe == "db" and cfg.dreambooth.use_ema,
        class_images=recipe == "db" and bool(db.class_data_dir and db.class_prompt and db.num_class_images),
        processes=1 if sharding else launched_processes(), ddp_gradient_as_bucket_view=t.ddp_gradient_as_bucket_view,
        sharding=sharding)


def bucket_areas(d, size: tuple[int, int]) -> tuple[float, ...]:
    """Areas (over the planned size's) of two other buckets a bucketed run alternates with: the largest one
    smaller than the planned size and the most elongated one (library.data.buckets). A bucket of the same area
    has tensors of the same sizes: nothing to fragment."""
    if not d.enable_bucket:
        return ()
    from library.data.buckets import BucketSettings, bucket_sizes

    area = size[0] * size[1]
    sizes = [b for b in bucket_sizes(BucketSettings(size, True, d.min_bucket_reso, d.max_bucket_reso,
                                                    d.bucket_reso_steps, d.bucket_no_upscale)) if b[0] * b[1] < area]
    if not sizes:
        return ()
    largest = max(sizes, key=lambda b: b[0] * b[1])
    elongated = max(sizes, key=lambda b: max(b) / min(b))
    return tuple(dict.fromkeys(b[0] * b[1] / area for b in (largest, elongated)))


def format_plan(p: Plan) -> str:
    s = p.settings
    lines = [f"memory plan: {s.arch} ({s.family}), {'full fine-tune' if s.recipe == 'db' else 'adapter'} training, "
             f"{s.width}x{s.height}, batch {s.batch_size}; {p.trainable:,} trainable parameters",
             f"  switches: {switch_text(s)}",
             f"  peak device memory of the training step: {p.peak / GIB:.2f} GiB"]
    for key in CATEGORIES:
        lines.append(f"    {key:<16} {p.breakdown.get(key, 0) / GIB:7.2f} GiB")
    lines += phase_lines(p)
    lines += [f"  note: {n}" for n in p.notes]
    lines.append(f"  (fake tensors, the optimizer state of a first step then one measured step, planned in "
                 f"{p.seconds:.0f}s; a faked device with CUDA's autocast policy and foreach optimizer kernels)")
    return "\n".join(lines)


PHASE_NAMES = {"class images": "class images", "vae": "VAE latents", "text": "text encoders",
               "step": "training step", "sample": "sampling", "save": "saving"}


def phase_lines(p: Plan) -> list[str]:
    """Per phase: allocated (tensors, in allocator blocks), reserved (max_memory_reserved) and the card total."""
    s = p.settings
    when = {"class images": "before training (prior preservation, while class images are missing)",
            "vae": "before training (cache_latents)" if s.cache_latents else "inside every step",
            "text": "before training (cached outputs)" if s.cache_text_encoder_outputs else "inside every step",
            "save": "at every save (the file built on the host)" if s.recipe == "db" else "at every save"}
    lines = [f"  per phase, GiB        allocated  reserved  card total (reserved + {p.card.context / GIB:.2f} "
             f"GiB CUDA context)"]
    for name, memory in p.phases.items():
        label = PHASE_NAMES.get(name, name)
        lines.append(f"    {label:<20} {memory.allocated / GIB:8.2f} {memory.reserved / GIB:9.2f} "
                     f"{p.card_total(name) / GIB:11.2f}   {when.get(name, '')}")
    lines.append(f"  card peak: {p.card_peak / GIB:.2f} GiB ({p.card.name}; cuBLAS workspace "
                 f"{p.card.cublas_workspace / 2**20:.1f} MiB included)")
    held = {k: v for k, v in p.host.items() if not k.startswith(SAVING)}
    if held:
        lines.append(f"  host RAM held while training: {p.host_training / GIB:.2f} GiB ("
                     + ", ".join(f"{k} {v / GIB:.2f}" for k, v in held.items()) + ")")
    if p.host_peak > p.host_training:
        lines.append(f"  host RAM while saving: {p.host_peak / GIB:.2f} GiB ("
                     + ", ".join(f"{k[len(SAVING):]} {v / GIB:.2f}" for k, v in p.host.items()
                                 if k.startswith(SAVING)) + " on top)")
    return lines


def switch_text(s: StepSettings) -> str:
    on = [f"mixed_precision={s.mixed_precision}"]
    on += [name for name in ("full_fp16", "full_bf16", "gradient_checkpointing", "cache_latents",
                             "cache_text_encoder_outputs", "fused_backward_pass", "offload_optimizer_state", "fp8_base",
                             "cpu_offload_checkpointing") if getattr(s, name)]
    if s.blocks_to_swap:
        on.append(f"blocks_to_swap={s.blocks_to_swap}")
    if s.t5xxl_precision != "auto":
        on.append(f"t5xxl_precision={s.t5xxl_precision}")
    if s.base_model_precision != "no_change":
        on.append(f"base_model_precision={s.base_model_precision}")
    if s.sample and s.sample_tiled_vae:
        on.append("sample_tiled_vae")
    if s.fused_optimizer_groups:
        on.append(f"fused_optimizer_groups={s.fused_optimizer_groups}")
    on.append(f"optimizer {s.optimizer_type}")
    if s.recipe == "db" and not s.train_text_encoder:
        on.append("text encoder frozen")
    if s.recipe == "network" and not s.train_text_encoder:
        on.append("denoiser only")
    return ", ".join(on)


def run(cfg, recipe: str, budget_gb: float | None = None) -> int:
    """--plan / --vram_budget from a recipe's main() (library/cli.py recipe_main, which turns a ConfigError into
    exit 2): print, and return the exit code. With a CUDA card present the plan is for that card, and without a
    budget the card's memory is the budget when the plan does not fit."""
    from library.config import ConfigError
    from library.planner.card import present_card

    try:
        s = settings_from_config(cfg, recipe)
    except ConfigError as e:
        raise ConfigError(f"{cfg.source}: {e}") from None
    card = present_card()
    if budget_gb is None:
        p = plan(s, card=card)
        print(format_plan(p), flush=True)
        if card is None or p.card_peak <= card.total - margin(card.total):
            return 0
        budget_gb = card.total / GIB
        print(f"this does not fit {card.name} ({budget_gb:.1f} GiB):", flush=True)
    print(f"searching memory switches for a {budget_gb:g} GiB budget ({s.arch}, {s.width}x{s.height}):", flush=True)
    found = search_budget(s, budget_gb, say=lambda line: print(line, flush=True), card=card)
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
