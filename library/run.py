"""The one setup of a run, called by both recipes (train_network.py, train_db.py) and by the memory planner
(library/planner/step.py), so that what the planner measures is what a run does, by construction: the checks
before anything starts, the accelerator and its precision, the family's parts frozen, cast and placed, the
memory switches, the caches, the optimizer and what goes through accelerator.prepare. Each recipe keeps its own
visible training loop; the plumbing around it lives here once.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from library.families import get_family
from library import phases
from library.phases import during

def refuse_unsupported(cfg, recipe: str) -> None:
    """What the config accepts but a run would fail on or silently ignore after loading, refused before
    anything loads, with what to do instead: what the engine `accelerate launch` set up cannot combine with
    (library/engines.py; recipe: "network" or "db"), bf16 on a GPU without it, and xformers for families
    whose attention runs on PyTorch SDPA whatever is set (SD3 / FLUX's joint attention)."""
    from library.config import ConfigError
    from library.config_checks import joined
    from library.devices import without_bf16
    from library.engines import engine_problems

    problems = engine_problems(cfg, recipe) + without_bf16(cfg)
    m = cfg.model
    family = get_family(m.family, m.pretrained_model_name_or_path) if cfg.train.xformers else None
    if family is not None and not family.xformers_attention:
        problems.append(f"'train.xformers': {family.name}'s joint attention runs on PyTorch SDPA, xformers would "
                        f"be ignored; remove 'train.xformers' (sdpa is the default)")
    if problems:
        raise ConfigError(joined(cfg.source, problems))


# ---- starting: the checks, the accelerator, the output folder --------------------------------------


@dataclass
class Started:
    accelerator: object  # accelerate.Accelerator
    say: Callable[[str], None]  # the main process' progress line
    lock: object = None  # the output folder's lock, held while the run lives (library/outputs.py)


def start(cfg, recipe: str) -> Started:
    """Everything before the data and the model: the seed drawn (or the resumed run's), the configs no run
    could train refused, TF32, the accelerator with the run's precision and trackers, the seed set, the output
    folder claimed and the resolved config written (main process)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from library.checkpoint import resumed_seed
    from library.config_files import write_resolved
    from library.devices import enable_tf32
    from library.engines import accelerator_settings
    from library.outputs import claim_output_dir
    from library.progress import Progress

    t, out_dir = cfg.train, Path(cfg.train.output_dir)
    if t.seed is None:
        t.seed = resumed_seed(cfg) or random.randint(0, 2**31 - 1)  # recorded in the resolved config
    refuse_unsupported(cfg, recipe)  # before anything starts or loads
    enable_tf32()
    accelerator = Accelerator(mixed_precision=t.mixed_precision,
                              gradient_accumulation_steps=t.gradient_accumulation_steps,
                              log_with=cfg.logging.log_with,
                              project_dir=cfg.logging.logging_dir or str(out_dir / "logs"),
                              **accelerator_settings(cfg))  # ddp_timeout, DDP's settings
    set_seed(t.seed)
    phases.start(accelerator.device)  # the peak memory of each phase, for the report at the end
    started = Started(accelerator, Progress(0, enabled=accelerator.is_main_process).write)
    if accelerator.is_main_process:
        started.lock = claim_output_dir(cfg)  # no second run writes here while this one lives
        write_resolved(cfg, out_dir / f"{t.output_name}-config.toml")
    return started


def start_trackers(accelerator, cfg) -> None:
    """logging.log_with: the trackers, with the resolved config as their hyperparameters."""
    if not cfg.logging.log_with:
        return
    hparams = {f"{section}.{key}": value if isinstance(value, (int, float, str, bool)) else str(value)
               for section, values in cfg.to_toml_dict().items() for key, value in values.items()}
    accelerator.init_trackers((cfg.logging.log_prefix or "") + cfg.train.output_name, config=hparams)


# ---- what trains ----------------------------------------------------------------------------------


def freeze(parts) -> None:
    for module in [parts.denoiser, parts.vae, *parts.text_encoders.values()]:
        module.requires_grad_(False)


def add_adapters(family, parts, settings, train_denoiser: bool, train_text_encoders: bool) -> list:
    """The adapters of `settings` (networks.settings.NetworkSettings) in the components that train, in the
    family's target order (the order their initial weights are drawn in). Returns the adapted components."""
    from networks.targets import inject

    freeze(parts)
    adapted, targets = [], family.adapter_targets(parts)
    if settings.train_llm_adapter and not any(t.llm_adapter_path for t in targets):
        from library.config import ConfigError

        raise ConfigError(f"'network.network_args': train_llm_adapter=True adapts Anima's LLM adapter; a "
                          f"{family.name} model has none: drop it")
    for target in targets:
        wanted = train_denoiser if target.component == "denoiser" else train_text_encoders
        if wanted and settings.adapts(target.component):  # adapts: a LyCORIS preset may leave a component out
            module = parts.denoiser if target.component == "denoiser" else parts.text_encoders[target.component]
            adapted.append(inject(module, target, settings))
    return adapted


def train_whole(parts, train_text_encoders: bool) -> list:
    """Full fine-tune: the denoiser trains, and the text encoders when asked. Returns the trained text encoders."""
    freeze(parts)
    parts.denoiser.requires_grad_(True)
    text_encoders = list(parts.text_encoders.values()) if train_text_encoders else []
    for encoder in text_encoders:
        encoder.requires_grad_(True)
    return text_encoders


# ---- memory switches ------------------------------------------------------------------------------


@dataclass
class Switches:
    """The precision and placement switches of a run (the planner's search changes them)."""
    mixed_precision: str = "no"
    full_fp16: bool = False
    full_bf16: bool = False
    no_half_vae: bool = False
    t5xxl_precision: str = "auto"
    xformers: bool = False
    sdpa: bool = True
    gradient_checkpointing: bool = False
    fp8_base: bool = False
    cpu_offload_checkpointing: bool = False
    blocks_to_swap: int | None = 0
    base_model_precision: str = "no_change"  # int8 / nf4: the frozen Linears through bitsandbytes (QLoRA)
    torch_compile: bool = False  # the denoiser's repeated blocks through torch.compile
    dynamo_backend: str = "inductor"

    @classmethod
    def from_config(cls, cfg) -> "Switches":
        t = cfg.train
        return cls(t.mixed_precision, t.full_fp16, t.full_bf16, t.no_half_vae, cfg.model.t5xxl_precision,
                   t.xformers, t.sdpa, t.gradient_checkpointing, t.fp8_base, t.cpu_offload_checkpointing,
                   t.blocks_to_swap, cfg.model.base_model_precision, t.torch_compile, t.dynamo_backend)


@dataclass
class Placed:
    dtype: object  # torch.dtype of the frozen weights
    attention: str  # the attention backend, as said
    swapper: object = None  # library.block_swap.BlockSwapper, or None
    compiled: int = 0  # blocks compiled (torch_compile)


def quantize_frozen(parts, sw: Switches, make_layer=None) -> dict[str, int]:
    """model.base_model_precision (QLoRA): every frozen Linear of the denoiser and text encoders stored int8 /
    nf4 through bitsandbytes (the planner passes its stand-in layer), before the adapters go in so that peft
    builds its LoRA layers on the quantized ones; T5 is left to t5xxl_precision when that is set. Returns
    {part: quantized Linear layers}, {} without it."""
    from library.memory import weight_dtype
    from library.quantization import quantize_base

    freeze(parts)
    more = {"make_layer": make_layer} if make_layer else {}
    return quantize_base(parts, sw.base_model_precision, weight_dtype(sw.mixed_precision),
                         keep_t5=sw.t5xxl_precision != "auto", **more)


def cast_frozen(parts, sw: Switches):
    """Frozen weights in the run's half precision (the VAE too, unless no_half_vae), T5 stored as
    model.t5xxl_precision asks (fp8 / int8 for encoding). What caching alone (python -m library.data cache)
    does too, so that its caches match a run's. Returns the weight dtype."""
    from library.memory import cast_frozen_parts, weight_dtype
    from library.quantization import store_t5

    dtype = weight_dtype(sw.mixed_precision)
    cast_frozen_parts(parts, dtype, sw.no_half_vae)
    store_t5(parts, sw.t5xxl_precision, dtype)
    return dtype


def apply_switches(family, parts, sw: Switches, trained: list, checkpointed_encoders: list, device,
                   whole: bool) -> Placed:
    """Frozen weights in half precision (the VAE too, unless no_half_vae), T5 stored as asked, the trained
    weights too with full_fp16 / full_bf16, the attention backend, gradient checkpointing (denoiser and the
    trained text encoders), fp8 frozen denoiser weights, checkpoints offloaded, block swap (of trained
    weights when `whole`: a full fine-tune), and torch_compile's blocks."""
    from library.block_swap import make_swapper
    from library.memory import (cast_trainable, compile_blocks, enable_gradient_checkpointing, offload_checkpoints,
                                set_attention, store_fp8_base)

    dtype = cast_frozen(parts, sw)
    if sw.full_fp16 or sw.full_bf16:
        cast_trainable(trained, dtype)
    attention = set_attention(parts.denoiser, sw.xformers, sw.sdpa)
    if sw.gradient_checkpointing:
        enable_gradient_checkpointing(parts.denoiser, checkpointed_encoders)
    if sw.fp8_base:  # frozen denoiser weights in float8, computed in `dtype`; adapters are left as they are
        store_fp8_base(parts.denoiser, dtype)
    if sw.cpu_offload_checkpointing:
        offload_checkpoints(parts.denoiser)
    swapper = make_swapper(family, parts, sw.blocks_to_swap, device, trained=whole)  # N blocks' frozen weights
    compiled = compile_blocks(parts.denoiser, sw.torch_compile, sw.dynamo_backend)  # after every hook is in place
    return Placed(dtype, attention, swapper, compiled)


# ---- caches and placement -------------------------------------------------------------------------


def cache_and_place(cfg, family, parts, dataset, text_frozen: bool, device, say, held_out=None):
    """The VAE and text encoders placed for training, the caches built on the way (cache_outputs), then the
    denoiser on the device (place_denoiser): the VAE pass of caching did not share the device with it. Returns
    the cached conditioning or None."""
    caches = dataset_caches(cfg, family, parts, dataset, say, held_out)
    conditioning = cache_outputs(family, parts, caches, text_frozen, device, say)
    place_denoiser(parts, device)
    return conditioning


@dataclass
class Caches:
    """What a run caches before training, and the work of caching it: `latents()` runs while the VAE is on the
    device, `text(apart, device)` while the cached text encoders visit it one at a time and returns caption ->
    conditioning in host memory. A run's come from its dataset (dataset_caches); the memory planner
    (library/planner/step.py) passes its own, which encode one planned batch, to the same cache_outputs."""
    latents: Callable[[], None] | None = None
    text: Callable[[str | None, object], dict] | None = None
    # prompts(encoders): the sample prompts through those encoders while they visit, recorded for sampling
    # (library.sampling.PromptOutputs: sampling then never brings them to the device)
    prompts: Callable[[list], None] | None = None


def dataset_caches(cfg, family, parts, dataset, say, held_out=None) -> Caches:
    """The caches a config asks for, over `dataset` (and `held_out`, the validation images): latents
    (dataset.cache_latents / _to_disk) and text-encoder outputs (train.cache_text_encoder_outputs / _to_disk)."""
    from library.data.cache import LatentCacheSettings, cache_folder, cache_latents, cache_text_outputs

    d, t = cfg.dataset, cfg.train
    sets = [dataset] + ([held_out] if held_out else [])

    def latents() -> None:
        settings = LatentCacheSettings(d.cache_latents_to_disk, cache_folder(cfg), d.vae_batch_size, t.seed)
        for images in sets:
            cache_latents(family, parts, images, settings, say)

    def text(apart, device) -> dict:
        captions = sorted({c for images in sets for c in images.captions})
        folder = cache_folder(cfg) if t.cache_text_encoder_outputs_to_disk else None
        return cache_text_outputs(family, parts, captions, cfg.model.clip_skip, folder, say, device, apart=apart)

    def prompts(encoders) -> None:
        from accelerate.state import AcceleratorState
        from accelerate.utils import get_mixed_precision_context_manager

        from library.sampling import PROMPT_OUTPUTS, PromptOutputs, settings_from_config
        from library.training import resolution

        recorded = PromptOutputs(encoders)
        in_precision = get_mixed_precision_context_manager(AcceleratorState().mixed_precision != "no")
        recorded.record(family, parts, settings_from_config(cfg, *resolution(d.resolution)), in_precision)
        parts.extra[PROMPT_OUTPUTS] = recorded
        say(f"sample prompts encoded once: {len(recorded.outputs)} text-encoder outputs kept for sampling")

    text_cached = t.cache_text_encoder_outputs or t.cache_text_encoder_outputs_to_disk
    return Caches(latents if d.cache_latents or d.cache_latents_to_disk else None, text if text_cached else None,
                  prompts if text_cached and cfg.sample.sample_prompts else None)


@during("caching")
def cache_outputs(family, parts, caches: Caches, text_frozen: bool, device, say):
    """Places the VAE and the text encoders for training, building the caches on the way: the VAE comes to
    `device` (and leaves again once latents are cached); text encoders whose outputs are cached visit the
    device one at a time while captions are encoded (library/offload.py), the others come to stay. The
    denoiser is not on the device yet. With trained text encoders, only the family's cached_apart encoder
    (FLUX.1 / SD3: T5) is cached, as sd-scripts does. Every move is told to library.memory's observers (the
    planner counts them). Returns the cached conditioning or None."""
    from library.memory import release_cached_blocks
    from library.offload import OneAtATime

    to_device(parts.vae, device)
    if caches.latents:
        caches.latents()
        to_host(parts.vae)  # sampling brings it back when it needs it
    conditioning, cached = None, []
    if caches.text:
        apart = None if text_frozen else family.cached_apart  # check_partial_cache: the others train
        cached = [apart] if apart else list(parts.text_encoders)
        encoders = [parts.text_encoders[name] for name in cached]
        with OneAtATime(encoders, device):
            conditioning = caches.text(apart, device)
            if caches.prompts:
                caches.prompts(encoders)
    for name, encoder in parts.text_encoders.items():
        if name not in cached:
            to_device(encoder, device)
    kept = (["vae"] if caches.latents else []) + cached
    if kept:
        say(f"kept on the CPU while training (outputs cached): {', '.join(kept)}")
    release_cached_blocks()  # what caching left cached goes back before the denoiser comes (as sd-scripts does)
    return conditioning


def place_denoiser(parts, device) -> None:
    """The denoiser to the device for training, after the caches are built (its swapped blocks stay on the
    host: library.block_swap.move)."""
    to_device(parts.denoiser, device)


def to_device(module, device) -> None:
    """`module` moved to `device` (a block-swapped denoiser's swapped weights stay on the host), the move told to
    library.memory's observers."""
    from library.block_swap import move
    from library.memory import tell

    move(module, device)
    swapper = getattr(module, "_block_swapper", None)
    for t in [*module.parameters(), *module.buffers()]:
        if swapper is None or not swapper.swaps(t):
            tell(t, "weights")


def to_host(module) -> None:
    """`module` moved to host memory, the move told to library.memory's observers."""
    from library.memory import tell

    module.to("cpu")
    for t in [*module.parameters(), *module.buffers()]:
        tell(t, "host")


# ---- optimizer, and what accelerate prepares --------------------------------------------------------


@dataclass
class OptimizerSettings:
    """The [optimizer] keys the optimizer is built from (the planner's search changes them)."""
    optimizer_type: str = "AdamW"
    learning_rate: float = 1e-4
    optimizer_args: list = field(default_factory=list)
    max_grad_norm: float = 1.0
    fused_backward_pass: bool = False
    fused_optimizer_groups: int | None = None
    offload_optimizer_state: bool = False  # the fused chunks' state in host memory between steps

    @property
    def fused(self) -> bool:
        return self.fused_backward_pass or bool(self.fused_optimizer_groups)

    @classmethod
    def from_config(cls, cfg) -> "OptimizerSettings":
        o = cfg.optimizer
        return cls(o.optimizer_type, o.learning_rate, list(o.optimizer_args), o.max_grad_norm,
                   o.fused_backward_pass, o.fused_optimizer_groups, o.offload_optimizer_state)


def adapter_groups(adapted, settings, network_section, learning_rate: float) -> list[dict]:
    """Param groups of the adapters: block-wise and per-component learning rates (networks/blockwise.py)."""
    from networks import blockwise

    n = network_section
    return blockwise.param_groups(adapted, settings, n.unet_lr, n.text_encoder_lr, learning_rate)


def whole_model_groups(denoiser, text_encoders: list, learning_rate: float, te_rate: float | None = None,
                       te2_rate: float | None = None) -> list[dict]:
    """Param groups of a full fine-tune: the denoiser, then each trained text encoder at its own rate."""
    groups = [{"params": list(denoiser.parameters()), "lr": learning_rate}]
    for index, encoder in enumerate(text_encoders):
        rate = te2_rate if index == 1 and te2_rate is not None else te_rate
        groups.append({"params": list(encoder.parameters()), "lr": rate or learning_rate})
    return groups


def make_optimizer(o: OptimizerSettings, groups: list[dict], swapper=None, processes: int = 1, build=None):
    """The optimizer of `groups`, plain or fused into the backward pass (then a swapped weight's state travels
    with its block). Returns (optimizer, the torch optimizers holding the state). `build` stands in for the
    optimizer class where its kernels cannot run (the planner's 8-bit layout)."""
    from library.config import ConfigError
    from library.optim import FusedBackward, build_optimizer

    if not o.fused:
        optimizer = (build or build_optimizer)(o.optimizer_type, groups, o.learning_rate, o.optimizer_args)
        return optimizer, [optimizer]
    if processes > 1:
        raise ConfigError("'optimizer.fused_backward_pass' steps inside backward, before gradients are averaged "
                          "across processes: train on one GPU, or turn it off")
    optimizer = FusedBackward(o.optimizer_type, groups, o.learning_rate, o.optimizer_args,
                              chunks=o.fused_optimizer_groups, max_grad_norm=o.max_grad_norm, build=build,
                              state_on_host=o.offload_optimizer_state)
    if swapper:
        swapper.optimizer_state = optimizer.state_of  # a swapped weight's state travels with it
        if optimizer.host_state is not None:  # and comes back with it: offload_optimizer_state leaves it alone
            optimizer.host_state.elsewhere = swapper.swaps
    return optimizer, optimizer.optimizers


def prepare(accelerator, parts, trained: list, optimizer, loader, fused: bool, full_fp16: bool):
    """What goes through accelerator.prepare: the trained modules (DDP with several processes, through
    library/engines.py; the parts stay bare for saving and sampling), the loader, and the optimizer unless it is
    fused into backward (it steps there, unprepared). full_fp16: the grad scaler unscales fp16 gradients.
    Returns (engine, optimizer, loader): the loop runs engine.step_parts under accumulate(*engine.engine_modules)."""
    from library.engines import is_deepspeed, is_sharded, prepare_deepspeed, prepare_sharded, prepare_trained
    from library.memory import allow_fp16_gradients

    if is_deepspeed(accelerator):  # ZeRO: the model and its optimizer are prepared together, the engine steps
        return prepare_deepspeed(accelerator, parts, trained, optimizer, loader,
                                 max(loader.batch_sampler.batch_sizes.values()))
    if is_sharded(accelerator):  # FSDP2: the model and its optimizer are prepared together
        return prepare_sharded(accelerator, parts, trained, optimizer, loader)
    engine = prepare_trained(accelerator, parts, trained)
    if fused:
        loader = accelerator.prepare(loader)
    else:
        optimizer, loader = accelerator.prepare(optimizer, loader)
    if full_fp16:
        allow_fp16_gradients(accelerator)
    return engine, optimizer, loader
