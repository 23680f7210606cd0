"""Past one GPU on accelerate's engines: which engine a run was launched under (read from the environment
`accelerate launch` and torchrun set), what each engine cannot combine with (refused before any model loads,
with what to use instead), the Accelerator's process-group and DDP settings, and the one place where the
trained modules are handed to the engine and where the bare modules are taken back.

    single     one process.
    ddp        N processes (`accelerate launch --multi_gpu`, `--cpu` with N processes, torchrun), each holding
               the whole model; DistributedDataParallel all-reduces the gradients in buckets while backward
               runs, and not at all on the micro-batches of gradient accumulation before the last (no_sync,
               through accelerator.accumulate).
    deepspeed  `accelerate launch --use_deepspeed --zero_stage N` (ACCELERATE_USE_DEEPSPEED), full fine-tunes of
               the denoiser under ZeRO-1/2/3 (deepspeed_problems names what it cannot run, before loading): the
               denoiser, its optimizer and the loader through one accelerator.prepare; DeepSpeed's engine scales
               for accumulation, reduces, clips and steps inside accelerator.backward (Prepared.steps_in_backward:
               the loop neither clips nor steps again); bf16 as torch autocast over fp32 weights (deepspeed_plugin;
               sampling autocasts as the engine does: autocast). The models load whole (loading_whole), the
               denoiser is partitioned when prepared; the weights file is assembled from the fp32 master copies on
               the main process (deepspeed_state), states are DeepSpeed checkpoints through accelerator.save_state,
               and every process samples (ZeRO-3's forward gathers from all).
    fsdp1      `accelerate config` with FSDP version 1: refused (accelerate deprecates it).
    fsdp2      `accelerate launch --use_fsdp --fsdp_version 2` (ACCELERATE_USE_FSDP, FSDP_VERSION=2), full
               fine-tunes of the denoiser: accelerate's fully_shard of each of the family's repeated blocks
               (ModelFamily.block_classes) and of the rest, the fp32 weights, gradients and optimizer state
               sharded N ways, one block's weights gathered at a time. Trained text encoders are sharded with
               it, as one model (sharded_together), a unit per layer. The sharded modules are the bare ones
               (fully_shard works in place): the weights file is gathered on the main process (full_weights),
               states are sharded through accelerator.save_state (library/checkpoint.py) and resume under
               FSDP2 with any number of processes (torch.distributed.checkpoint reshards the weights and the
               optimizer state as it loads them), and every process samples (each block's forward gathers its
               weights from all of them). With use_ema each process averages its own shards
               (library/sharded_ema.py), gathered for the -ema file and written sharded into states.

The families never see an engine: the recipe's step gets `step_parts` (the trained modules behind the
engine's wrapper, DDP's or DeepSpeed's, through `Engined`, which reads every attribute off the bare module);
everything else (saving, sampling, EMA, validation, the planner) keeps the bare parts, which share their
parameters with the wrapped ones, so nothing is ever unwrapped. With one process nothing is wrapped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os

TRUE = ("1", "true", "yes")
ENGINE_NAMES = {"single": "one process", "ddp": "DDP", "deepspeed": "DeepSpeed", "fsdp1": "FSDP (version 1)",
                "fsdp2": "FSDP2"}


def launched_engine(environ=None) -> str:
    """The engine `accelerate launch` (or torchrun) set up for this process, from the environment alone
    (nothing is initialised): "single", "ddp", "deepspeed", "fsdp1" or "fsdp2"."""
    env = os.environ if environ is None else environ
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() in TRUE:
        return "deepspeed"
    if env.get("ACCELERATE_USE_FSDP", "").lower() in TRUE:
        return "fsdp2" if env.get("FSDP_VERSION", "1") == "2" else "fsdp1"  # accelerate's default is 1
    return "ddp" if launched_processes(env) > 1 else "single"


def launched_processes(environ=None) -> int:
    """WORLD_SIZE, as accelerate launch / torchrun set it (1 when launched plainly)."""
    env = os.environ if environ is None else environ
    return int(env.get("WORLD_SIZE", "1") or 1)


def launched_zero_stage(environ=None) -> int | None:
    """The ZeRO stage `accelerate launch --use_deepspeed --zero_stage N` set (None: not set, e.g. named in a
    DeepSpeed config file instead)."""
    env = os.environ if environ is None else environ
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "")
    return int(stage) if stage.isdigit() else None


def engine_problems(cfg, recipe: str, environ=None) -> list[str]:
    """What this run's engine cannot combine with this config, each with what to use instead ([] if none).
    recipe: "network" (adapters) or "db" (full fine-tune). Runs before any model loads."""
    engine = launched_engine(environ)
    o, t = cfg.optimizer, cfg.train
    fused = o.fused_backward_pass or bool(o.fused_optimizer_groups)
    if engine == "ddp":
        problems = []
        if fused:
            problems.append("'optimizer.fused_backward_pass' / 'fused_optimizer_groups' step each weight inside "
                            f"backward, before DDP has averaged its gradient over the {launched_processes(environ)} "
                            "processes: turn it off (an 8-bit or factored optimizer, AdamW8bit / Adafactor, saves "
                            "most of its memory), or train on one GPU")
        if recipe == "db" and t.blocks_to_swap:
            problems.append("'train.blocks_to_swap' in train_db.py needs the fused backward pass, which DDP cannot "
                            "run: set it to 0 (gradient_checkpointing and an 8-bit optimizer instead), or train on "
                            "one GPU")
        return problems
    if engine == "deepspeed":
        return deepspeed_problems(cfg, recipe, environ)
    if engine == "fsdp1":
        return ["accelerate is set up for FSDP version 1, which accelerate deprecates and this trainer does not run: "
                "run `accelerate config` again with plain multi-GPU (DDP), or for a full fine-tune with FSDP version "
                "2 (`accelerate launch --use_fsdp --fsdp_version 2`)"]
    if engine == "fsdp2":
        return fsdp2_problems(cfg, recipe, environ)
    return []


EIGHT_BIT = ("8bit", "paged")  # bitsandbytes' optimizers: AdamW8bit, Lion8bit, PagedAdamW, PagedAdamW8bit...


def deepspeed_problems(cfg, recipe: str, environ=None) -> list[str]:
    """What a DeepSpeed launch cannot run, all of it at once: deepspeed not installed, the adapters recipe,
    what ZeRO cannot shard (the fused backward pass, block swap, 8-bit optimizers, a second trained model, full
    half-precision weights; torch_compile under ZeRO-3), CPU offload of an optimizer DeepSpeed has no CPU
    version of (or whose CPU Adam cannot build here), and a gradient accumulation / clipping the launch sets
    otherwise than the config."""
    import importlib.util

    env = os.environ if environ is None else environ
    if recipe == "network":
        return ["accelerate is set up for DeepSpeed, which does not help adapter training: ZeRO shards the "
                "optimizer state and gradients, and an adapter's are a few MB per GPU; run `accelerate "
                "config` again with plain multi-GPU (DDP), and save memory on the frozen base with fp8_base, "
                "blocks_to_swap or gradient_checkpointing"]
    if importlib.util.find_spec("deepspeed") is None:
        return ["accelerate is set up for DeepSpeed, which is not installed (`pip install deepspeed`); or run "
                "`accelerate config` again with FSDP2 (`accelerate launch --use_fsdp --fsdp_version 2`), which "
                "shards a full fine-tune as ZeRO-3 does"]
    return _zero_limits(cfg, env) + _offload_problems(cfg, env) + _launch_mismatches(cfg, env)


def _zero_limits(cfg, env) -> list[str]:
    """What ZeRO cannot shard, with what to use instead."""
    o, t, db = cfg.optimizer, cfg.train, cfg.dreambooth
    problems = []
    if o.fused_backward_pass or o.fused_optimizer_groups or t.blocks_to_swap:
        problems.append("'optimizer.fused_backward_pass' / 'fused_optimizer_groups' / 'train.blocks_to_swap' step "
                        "or move weights inside backward, where ZeRO reduces and partitions them: turn them off "
                        "(ZeRO divides the optimizer state by the number of GPUs; offload_optimizer_device cpu "
                        "moves it to host RAM)")
    if any(word in o.optimizer_type.lower() for word in EIGHT_BIT):
        problems.append(f"'optimizer.optimizer_type' {o.optimizer_type}: ZeRO partitions the optimizer state "
                        f"over flat fp32 copies of the weights, bitsandbytes' 8-bit state is not one it "
                        f"partitions: use AdamW (ZeRO divides its state by the number of GPUs) or Adafactor")
    if db.train_text_encoder:
        problems.append("'dreambooth.train_text_encoder': accelerate gives DeepSpeed one model, the denoiser; set it "
                        "to false, or train the text encoders with plain multi-GPU (DDP)")
    if db.use_ema and launched_zero_stage(env) == 3:
        problems.append("'dreambooth.use_ema' with ZeRO-3: the weights are partitioned, the EMA would gather them "
                        "at every update; turn it off, or use ZeRO-2")
    if cfg.train.full_fp16 or cfg.train.full_bf16:
        problems.append("'train.full_fp16' / 'full_bf16': DeepSpeed keeps fp32 master weights in its optimizer and "
                        "computes in 'train.mixed_precision' (its module in that precision); remove them")
    if t.torch_compile and launched_zero_stage(env) == 3:
        problems.append("'train.torch_compile' with ZeRO-3: the hooks that gather each block's weights run inside "
                        "the compiled blocks, and dynamo recompiles them past its limit (they then run uncompiled); "
                        "use ZeRO-2, or turn torch_compile off")
    return problems


OFFLOADABLE = ("adamw", "adam")  # what accelerate hands to DeepSpeedCPUAdam (map_pytorch_optim_to_deepspeed)


def _offload_problems(cfg, env) -> list[str]:
    """`offload_optimizer_device cpu`: accelerate swaps the optimizer for DeepSpeed's CPU Adam (any other optimizer
    would silently become Adam), a C++ op built on first use with this machine's compiler."""
    if env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none").lower() in ("", "none"):
        return []
    optimizer = cfg.optimizer.optimizer_type
    if optimizer.lower() not in OFFLOADABLE:
        return [f"'optimizer.optimizer_type' {optimizer} with DeepSpeed's offload_optimizer_device: the optimizer "
                f"state on the CPU is stepped by DeepSpeed's CPU Adam, which would replace {optimizer} with Adam; "
                f"use AdamW, or drop --offload_optimizer_device"]
    why = cpu_adam_problem()
    return [f"DeepSpeed's offload_optimizer_device needs its CPU Adam, which cannot be built here ({why}): install "
            f"them (or deepspeed with DS_BUILD_CPU_ADAM=1), or drop --offload_optimizer_device (ZeRO divides the "
            f"optimizer state by the number of GPUs)"] if why else []


def cpu_adam_problem() -> str | None:
    """Why DeepSpeed's CPU Adam cannot be built on this machine (None when it can): unless deepspeed was installed
    with it prebuilt (DS_BUILD_CPU_ADAM=1), it is compiled on first use (then cached in ~/.cache/torch_extensions)
    by ninja with the C++ compiler (CXX, else c++)."""
    import shutil

    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import is_ninja_available

    if installed_ops.get("cpu_adam"):
        return None
    missing = [name for name, found in (("a C++ compiler", shutil.which(os.environ.get("CXX", "c++"))),
                                        ("ninja", is_ninja_available())) if not found]
    return f"deepspeed has no prebuilt CPU Adam and {' and '.join(missing)} not found" if missing else None


def _launch_mismatches(cfg, env) -> list[str]:
    """Values `accelerate launch --use_deepspeed` sets when given (ACCELERATE_GRADIENT_ACCUMULATION_STEPS,
    ACCELERATE_GRADIENT_CLIPPING) that differ from the config's (precision: the Accelerator is given the
    config's mixed_precision, whatever the launch says)."""
    t, o = cfg.train, cfg.optimizer
    ours = {"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": ("train.gradient_accumulation_steps",
                                                       t.gradient_accumulation_steps, int),
            "ACCELERATE_GRADIENT_CLIPPING": ("optimizer.max_grad_norm", o.max_grad_norm, float)}
    problems = []
    for var, (key, value, kind) in ours.items():
        launched = env.get(var, "")
        if launched and launched.lower() not in ("auto", "none") and kind(launched) != value:
            problems.append(f"'{key}' is {value!r}, the DeepSpeed launch says {launched} ({var}): make them the "
                            f"same (the config's value is the one the run means)")
    return problems


def fsdp2_problems(cfg, recipe: str, environ=None) -> list[str]:
    """What FSDP2 cannot run, each with what to use instead. FSDP2 shards the one model accelerate prepares
    with the optimizer (the denoiser, with the trained text encoders), keeps its weights in fp32 and steps each
    shard after backward."""
    if recipe == "network":
        return ["accelerate is set up for FSDP2, which does not help adapter training: it shards the trained "
                "weights, their gradients and optimizer state, and an adapter's are a few MB per GPU; run "
                "`accelerate config` again with plain multi-GPU (DDP), and save memory on the frozen base with "
                "fp8_base, blocks_to_swap or gradient_checkpointing"]
    env = os.environ if environ is None else environ
    o, t, db = cfg.optimizer, cfg.train, cfg.dreambooth
    problems = []
    if o.fused_backward_pass or o.fused_optimizer_groups:
        problems.append("'optimizer.fused_backward_pass' / 'fused_optimizer_groups' step each weight inside "
                        "backward, before FSDP2 has reduced its gradient shard: turn it off (FSDP2 already divides "
                        "the optimizer state by the number of GPUs)")
    if t.blocks_to_swap:
        problems.append("'train.blocks_to_swap' moves whole blocks to the CPU, FSDP2 holds a shard of each: set it "
                        "to 0 (FSDP2 divides the weights by the number of GPUs; gradient_checkpointing for the "
                        "activations)")
    if db.train_text_encoder and env.get("FSDP_AUTO_WRAP_POLICY"):
        problems.append(f"'dreambooth.train_text_encoder' with the launch's own FSDP wrapping "
                        f"(--fsdp_auto_wrap_policy {env['FSDP_AUTO_WRAP_POLICY']}): the denoiser and the text "
                        f"encoders are sharded together, each its own unit, by the trainer's wrapping; launch "
                        f"without --fsdp_auto_wrap_policy, or set train_text_encoder to false")
    if t.full_fp16 or t.full_bf16:
        problems.append("'train.full_fp16' / 'full_bf16': FSDP2 keeps the trained weights sharded in fp32 and "
                        "computes in 'train.mixed_precision' (its MixedPrecisionPolicy); remove them")
    if t.torch_compile:
        problems.append("'train.torch_compile' compiles the blocks before FSDP2 shards them, so none would be "
                        "sharded as its own unit: turn it off with FSDP2")
    return problems


def accelerator_settings(cfg) -> dict:
    """The Accelerator's kwargs_handlers for the process group and DDP: ddp_timeout (minutes; rank 0 may cache
    latents or make class images for longer than the default watchdog of 10 minutes while the others wait),
    ddp_gradient_as_bucket_view, ddp_static_graph; unused parameters found in each backward (a text encoder's
    last layer under clip_skip, adapter module dropout) so they are neither waited for nor moved."""
    from datetime import timedelta

    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    t = cfg.train
    settings = {"kwargs_handlers": [
        InitProcessGroupKwargs(timeout=timedelta(minutes=t.ddp_timeout)),
        DistributedDataParallelKwargs(find_unused_parameters=True,
                                      gradient_as_bucket_view=t.ddp_gradient_as_bucket_view,
                                      static_graph=t.ddp_static_graph)]}
    if launched_engine() == "fsdp2":
        settings["fsdp_plugin"] = fsdp2_plugin(cfg)
    if launched_engine() == "deepspeed":
        settings["deepspeed_plugin"] = deepspeed_plugin(cfg)
    return settings


def fsdp2_plugin(cfg, environ=None):
    """accelerate's FSDP2 plugin: what `accelerate launch` set (offload, resharding, ...) from the
    environment, and unless the launch named its own wrapping (--fsdp_auto_wrap_policy), a unit per block of the
    family's block classes. States are always saved sharded (the weights file is gathered apart)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    from library.families import get_family

    env = os.environ if environ is None else environ
    named = {}
    if not env.get("FSDP_AUTO_WRAP_POLICY"):
        family = get_family(cfg.model.family, cfg.model.pretrained_model_name_or_path)
        named = {"auto_wrap_policy": "transformer_based_wrap",
                 "transformer_cls_names_to_wrap": list(family.block_classes)}
    return FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT", **named)


def deepspeed_plugin(cfg):
    """accelerate's DeepSpeed plugin: what `accelerate launch --use_deepspeed` set (ZeRO stage, offload, a config
    file) from the environment, with the config's gradient accumulation and clipping (max_grad_norm; 0: none,
    written as 0 since accelerate leaves a 0 out and DeepSpeed 0.19 then clips at 1.0), which DeepSpeed's engine
    applies itself. ZeRO-3's zero.Init at load time stays off (accelerate would hand it
    to transformers, partitioning the frozen text encoders no engine manages): the denoiser is partitioned when
    prepared. bf16 runs as on one GPU: the trained weights stay fp32 and the forward runs under torch.autocast
    (DeepSpeed's torch_autocast; its bf16 mode would cast the module to bf16 first and make the fp32 master weights
    from those rounded copies), gradients reduced in fp32 (no module marked for lower-precision communication)."""
    from accelerate.utils import DeepSpeedPlugin

    t, o = cfg.train, cfg.optimizer
    plugin = DeepSpeedPlugin(gradient_accumulation_steps=t.gradient_accumulation_steps,
                             gradient_clipping=float(o.max_grad_norm), zero3_init_flag=False)
    if plugin.deepspeed_config.get("gradient_clipping", "auto") == "auto":  # 0 too: DeepSpeed's default clips at 1.0
        plugin.deepspeed_config["gradient_clipping"] = float(o.max_grad_norm)
    if t.mixed_precision == "bf16" and "bf16" not in plugin.deepspeed_config:  # a config file's own choice stays
        plugin.deepspeed_config["bf16"] = {"enabled": False}
        plugin.deepspeed_config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16",
                                                     "lower_precision_safe_modules": []}
    return plugin


@contextlib.contextmanager
def loading_whole(accelerator):
    """Around loading the model: under DeepSpeed, accelerate points transformers at its ZeRO config (whatever
    zero3_init_flag says), and with ZeRO-3 transformers would then partition every model it loads (zero.Init), the
    frozen text encoders too, which no engine gathers. So transformers is not told while the models load; only the
    denoiser is partitioned, when prepared. Otherwise nothing."""
    if not is_deepspeed(accelerator):
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


def autocast(accelerator):
    """The run's autocast for what runs outside the engine's forward (sampling): accelerator.autocast(), which is
    none under DeepSpeed (its engine autocasts its own forward); there torch.autocast in the dtype of the DeepSpeed
    config's torch_autocast (bf16 runs: fp32 weights), else none (fp16 / fp32: the module in the compute dtype)."""
    if not is_deepspeed(accelerator):
        return accelerator.autocast()
    section = accelerator.state.deepspeed_plugin.deepspeed_config.get("torch_autocast", {})
    if not section.get("enabled"):
        return contextlib.nullcontext()
    import torch

    return torch.autocast(accelerator.device.type, dtype=getattr(torch, section.get("dtype", "bfloat16")))


class Engined:
    """A trained module as the step calls it: called, it runs the engine's wrapper (DDP's forward, which
    sets up the bucketed all-reduce of its backward); any attribute (`config`, `device`, `dtype`, blocks) is
    the bare module's, so a family cannot tell the difference."""

    def __init__(self, engine_module, bare):
        self.engine_module, self.bare = engine_module, bare

    def __call__(self, *args, **kwargs):
        return self.engine_module(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.bare, name)


@dataclasses.dataclass
class Prepared:
    """The trained modules after accelerator.prepare: `engine_modules` (for accelerator.accumulate, in the
    order given) and `step_parts` (the parts the step calls: trained modules behind the engine; the bare
    `parts` stay what everything else uses)."""
    engine_modules: list
    step_parts: object
    steps_in_backward: bool = False  # DeepSpeed: accelerator.backward clips, steps and zeroes; optimizer.step is none


def prepare_trained(accelerator, parts, trained: list) -> Prepared:
    """Hands the trained modules of `parts` (the denoiser and/or text encoders, each with a parameter that
    trains) to accelerate's engine. Frozen parameters and buffers are left out of DDP's start-up broadcast
    and of its buckets (every process loaded the same weights); accelerate's autocast wrapper on forward is
    taken off again (the loop autocasts, and outputs keep the dtype one process gives them). One process:
    the modules come back bare."""
    from accelerate.utils import extract_model_from_parallel
    from torch.nn.parallel import DistributedDataParallel

    trained = list({id(m): m for m in trained}.values())  # a module two adapter targets share: once
    if accelerator.num_processes == 1:  # (torchrun with one process is MULTI_CPU / MULTI_GPU: still nothing)
        return Prepared(trained, parts)
    engine_modules = []
    for module in trained:
        frozen = [name for name, p in module.named_parameters() if not p.requires_grad]
        frozen += [name for name, _ in module.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)
        wrapped = accelerator.prepare_model(module, device_placement=False)  # placement is the run's business
        extract_model_from_parallel(wrapped, keep_fp32_wrapper=False)  # the bare forward again
        engine_modules.append(wrapped)
    engined = {id(bare): Engined(wrapped, bare) for bare, wrapped in zip(trained, engine_modules)}
    step_parts = dataclasses.replace(
        parts, denoiser=engined.get(id(parts.denoiser), parts.denoiser),
        text_encoders={name: engined.get(id(e), e) for name, e in parts.text_encoders.items()})
    return Prepared(engine_modules, step_parts)



def is_sharded(accelerator) -> bool:
    """Whether the trained weights or their optimizer state are sharded over the processes (FSDP2, DeepSpeed
    ZeRO): saving gathers them with every process taking part, states are saved by every process, and every
    process samples (under ZeRO-3 each forward gathers the weights from all of them)."""
    return is_fsdp2(accelerator) or is_deepspeed(accelerator)


def is_fsdp2(accelerator) -> bool:
    """Whether the trained modules are FSDP2's (DTensor shards: what library/sharded_ema.py averages)."""
    return bool(getattr(accelerator, "is_fsdp2", False))


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def prepare_sharded(accelerator, parts, trained: list, optimizer, loader):
    """FSDP2: the trained modules, their optimizer and the loader through one accelerator.prepare (accelerate
    shards the model in place, a unit per block of its fsdp_plugin's classes, then points the optimizer at the
    shards). accelerate shards one model: trained text encoders go with the denoiser in one module
    (sharded_together). The step calls the parts as they are. Returns (Prepared, optimizer, loader)."""
    model = parts.denoiser if len(trained) == 1 else sharded_together(accelerator.state.fsdp_plugin, parts, trained)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    return Prepared([model], parts), optimizer, loader


def sharded_together(plugin, parts, trained: list):
    """The denoiser and the trained text encoders as one module for accelerate's FSDP2 (their parent, never
    called), each of them its own unit (their classes added to the plugin's, with the text encoders' layers
    transformers names in `_no_split_modules`): the container holds no parameter of its own, so calling a
    part gathers what it needs, as the denoiser alone does."""
    import torch
    from transformers import PreTrainedModel

    from library.config import ConfigError

    encoders = {name: e for name, e in parts.text_encoders.items() if any(e is m for m in trained)}
    for name, encoder in encoders.items():  # unsharded_copy must rebuild it for saving: known before training
        if not isinstance(encoder, PreTrainedModel):
            raise ConfigError(f"'dreambooth.train_text_encoder': the text encoder {name} "
                              f"({type(encoder).__name__}) cannot be gathered from FSDP2's shards for saving; "
                              f"set it to false, or train with plain multi-GPU (DDP)")
    present = {type(m).__name__ for e in encoders.values() for m in e.modules()}
    layers = [n for e in encoders.values() for n in (getattr(e, "_no_split_modules", None) or []) if n in present]
    names = [*plugin.transformer_cls_names_to_wrap, *(type(m).__name__ for m in trained), *layers]
    plugin.transformer_cls_names_to_wrap = list(dict.fromkeys(names))
    together = torch.nn.Module()  # not a ModuleDict: fully_shard takes no container without a forward
    for name, module in {"denoiser": parts.denoiser, **encoders}.items():
        together.add_module(name, module)
    return together


def prepare_deepspeed(accelerator, parts, trained: list, optimizer, loader, batch_size: int):
    """DeepSpeed ZeRO: the denoiser, its optimizer and the loader through one accelerator.prepare (deepspeed.initialize:
    the engine holds the fp32 master weights and optimizer state partitioned, ZeRO-3 the weights too, and clips,
    accumulates and steps inside accelerator.backward). The loader's batches come from a batch sampler, so the
    micro-batch size DeepSpeed asks for is given (it only checks the batch arithmetic with it). The scheduler stays
    outside: it sets the learning rate of the optimizer's groups, which DeepSpeed's optimizer steps with. The step
    calls the engine (its forward), everything else the bare denoiser. Returns (Prepared, optimizer, loader)."""
    if [id(m) for m in trained] != [id(parts.denoiser)]:
        raise ValueError("DeepSpeed trains the denoiser alone")  # deepspeed_problems refused the rest before loading
    accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size
    engine, optimizer, loader = accelerator.prepare(parts.denoiser, optimizer, loader)
    step_parts = dataclasses.replace(parts, denoiser=Engined(engine, parts.denoiser))
    return Prepared([engine], step_parts, steps_in_backward=True), optimizer, loader


@contextlib.contextmanager
def full_weights(accelerator, parts):
    """The parts as saving reads them. Sharded (FSDP2, DeepSpeed): every process takes part in gathering the
    weights of the sharded parts to the main process' CPU (FSDP2: the denoiser and trained text encoders,
    gathered; DeepSpeed: the denoiser's fp32 masters, deepspeed_state), where they fill unsharded copies (built
    without memory of their own, on the meta device); the other processes get None. Otherwise the parts."""
    from torch.distributed.fsdp import FSDPModule

    if not is_sharded(accelerator):
        yield parts
        return
    modules = {"denoiser": parts.denoiser, **parts.text_encoders}
    if is_deepspeed(accelerator):  # DeepSpeed trains the denoiser alone
        whole = {"denoiser": deepspeed_state(accelerator, parts.denoiser)}
    else:  # every process, in the same order
        whole = {name: gathered(accelerator, m.state_dict()) for name, m in modules.items() if isinstance(m, FSDPModule)}
    if not accelerator.is_main_process:
        yield None
        return
    copies = {name: unsharded_copy(m, whole[name]) if name in whole else m for name, m in modules.items()}
    yield dataclasses.replace(parts, denoiser=copies.pop("denoiser"), text_encoders=copies)


def gathered(accelerator, state: dict) -> dict | None:
    """`state` (DTensors and plain tensors) whole on the main process' CPU (None on the others): each tensor
    all-gathered in turn (one tensor's full size on the device at a time), copied to the host on the main
    process. Not accelerator.get_state_dict: its cpu_offload is no copy for CPU processes, so the tensors it
    returns there point at gathered storage FSDP has already freed ("invalid python storage")."""
    from torch.distributed.tensor import DTensor

    main = accelerator.is_main_process
    whole = {}
    for name, tensor in state.items():
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor  # every process: a collective
        if main:
            whole[name] = full.detach().to("cpu", copy=True)
    return whole if main else None


def deepspeed_state(accelerator, module) -> dict | None:
    """The full fp32 state dict of a module DeepSpeed trains, on the main process' CPU (None on the others):
    each weight's fp32 master copy assembled from its partitions in turn (deepspeed.utils.safe_get_full_fp32_param,
    a collective every process joins; under bf16 / fp16 the module itself holds rounded copies), buffers as the
    module holds them (never partitioned)."""
    from deepspeed.utils import safe_get_full_fp32_param

    main = accelerator.is_main_process
    state = {}
    for name, param in module.named_parameters():
        full = safe_get_full_fp32_param(param)
        if main:
            state[name] = (param if full is None else full).detach().to("cpu", copy=True)
    if not main:
        return None
    names = set(module.state_dict())  # persistent buffers only
    state.update({name: b.detach().to("cpu", copy=True) for name, b in module.named_buffers() if name in names})
    return state


def unsharded_copy(module, state: dict):
    """A module of `module`'s class before fully_shard (a diffusers or transformers model, from its config)
    holding `state`, and copies of the buffers no state dict holds (CLIP's position_ids: never sharded)."""
    import torch
    from torch.distributed.fsdp import FSDPModule

    cls = next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):  # diffusers' models are made from their config, transformers' given theirs
        copy = cls.from_config(module.config) if hasattr(cls, "from_config") else cls(module.config)
    copy.load_state_dict(state, assign=True)
    for name, buffer in module.named_buffers():
        if name not in state:
            owner, _, leaf = name.rpartition(".")
            copy.get_submodule(owner).register_buffer(leaf, buffer.detach().to("cpu", copy=True), persistent=False)
    return copy.train(module.training)
