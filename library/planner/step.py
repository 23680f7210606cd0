"""The training step of a config, run for the planner: the model built from its architecture configs
(no weights), the recipe's adapters, memory switches, optimizer and batch_loss: the optimizer state as the
first step leaves it (warm_up_state), then one measured step (forward, backward, optimizer step).

The order of calls is the recipes' (train_network.py / train_db.py): what trains -> adapters -> casts ->
attention -> gradient checkpointing -> pre-encoding (VAE, text encoders) -> offload -> optimizer ->
batch_loss, backward, clipping, optimizer step, zero_grad. Only the library functions the recipes call
are used, so a switch that does not save what it should shows in the plan.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from library.planner.tracker import FakeDevice, MemoryTracker

STEPS = 1  # measured steps, after warm_up_state (a plan's time is its number of operators)
# the text-encoder names each family's Components use, by diffusers subfolder (families may instead
# provide `planning_parts(arch_dir) -> Components` themselves; SD3 / FLUX should)
TEXT_ENCODER_NAMES = {"sd1": {"text_encoder": "te"}, "sdxl": {"text_encoder": "te1", "text_encoder_2": "te2"},
                      "flux": {"text_encoder": "te1", "text_encoder_2": "te3"}, "chroma": {"text_encoder": "te3"},
                      "sd3": {"text_encoder": "te1", "text_encoder_2": "te2", "text_encoder_3": "te3"}}
DENOISER_FOLDERS = ("unet", "transformer")


@dataclass
class StepSettings:
    """What of a config the memory depends on (the planner's search changes these)."""
    recipe: str  # "network" or "db"
    family: str
    arch: str  # a shipped architecture name or a folder of configs
    width: int
    height: int
    batch_size: int = 1
    mixed_precision: str = "no"
    full_fp16: bool = False
    full_bf16: bool = False
    no_half_vae: bool = False
    gradient_checkpointing: bool = False
    sdpa: bool = True
    cache_latents: bool = False
    cache_text_encoder_outputs: bool = False
    optimizer_type: str = "AdamW"
    optimizer_args: list = field(default_factory=list)
    max_grad_norm: float = 1.0
    fused_backward_pass: bool = False
    fused_optimizer_groups: int | None = None
    train_text_encoder: bool = True  # db: dreambooth.train_text_encoder; network: not network_train_unet_only
    train_unet: bool = True  # network: not network_train_text_encoder_only
    clip_skip: int = 1
    v_parameterization: bool = False
    fp8_base: bool = False
    blocks_to_swap: int = 0
    cpu_offload_checkpointing: bool = False
    t5xxl_precision: str = "auto"  # model.t5xxl_precision (library.quantization)
    base_model_precision: str = "no_change"  # model.base_model_precision (library.quantization.quantize_base)
    sample: bool = False  # sample.sample_prompts: sampling during training
    ema: bool = False  # dreambooth.use_ema: an EMA copy of the denoiser in host memory (train_db.py)
    bucket_areas: tuple = ()  # other bucket sizes' areas over width x height (enable_bucket): fragmentation
    network: object = None  # the config's [network] section (adapter recipe)
    learning_rate: float = 1e-4


@dataclass
class StepMeasure:
    tracker: MemoryTracker
    phases: dict[str, object]  # window name -> Peak
    notes: list[str]
    trainable: int = 0
    frozen: int = 0
    host: dict = field(default_factory=dict)  # what -> bytes of host memory the run holds


class _PlanTokenizer:
    """Stands in for a tokenizer (none ships with the architectures): ids of the full padded length."""

    def __init__(self, max_length: int):
        self.model_max_length = max_length

    def __call__(self, captions, max_length=None, **_):
        ids = torch.zeros((len(captions), max_length or self.model_max_length), dtype=torch.long)
        return type("Tokens", (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})()


def build_parts(family, family_name: str, arch: Path):
    """Components of the architecture in `arch` (diffusers layout of configs), with random-init weights
    on the current (fake) device: what family.load() returns, minus the weights."""
    from library.families.base import Components, ModelSource

    if hasattr(family, "planning_parts"):
        return family.planning_parts(arch)
    import diffusers
    import transformers

    modules, tokenizers, scheduler = {}, {}, None
    for sub in sorted(p for p in arch.iterdir() if p.is_dir()):
        config_path = next((sub / n for n in ("config.json", "scheduler_config.json") if (sub / n).is_file()), None)
        if config_path is None:  # tokenizer folders
            continue
        config = json.loads(config_path.read_text())
        if "scheduler" in sub.name:
            scheduler = getattr(diffusers, config["_class_name"]).from_pretrained(str(arch), subfolder=sub.name)
        elif "_class_name" in config:
            cls = getattr(diffusers, config["_class_name"])
            modules[sub.name] = cls.from_config(cls.load_config(str(arch), subfolder=sub.name))
        else:
            cls = getattr(transformers, config["architectures"][0])
            tconfig = transformers.AutoConfig.from_pretrained(str(sub))
            modules[sub.name] = cls(tconfig)
    names = TEXT_ENCODER_NAMES.get(family_name, {})
    text = {names.get(k, k): m for k, m in modules.items() if k.startswith("text_encoder")}
    for name, sub in ((names.get(k, k), k) for k in modules if k.startswith("text_encoder")):
        length = getattr(modules[sub].config, "max_position_embeddings", 512)
        tokenizers[name] = _PlanTokenizer(length)
    denoiser = next(modules[k] for k in DENOISER_FOLDERS if k in modules)
    return Components(denoiser=denoiser, vae=modules["vae"], text_encoders=text, tokenizers=tokenizers,
                      noise_scheduler=scheduler, source=ModelSource(str(arch)),
                      extra={"arch": str(arch), "v2": "sd2" in arch.name})


def _storages(module: torch.nn.Module):
    return [*module.parameters(), *module.buffers()]


def measure_step(s: StepSettings, fake: bool = True, arch_path: Path | None = None) -> StepMeasure:
    """Run the step of `s` (on fake tensors unless fake=False) with the optimizer state in place, and return
    the tracker."""
    from library.families import get_family
    from library.loading import arch_dir

    family = get_family(s.family, "")
    arch = arch_path or arch_dir(s.arch)
    notes: list[str] = []
    with FakeDevice(fake=fake), MemoryTracker(fake_scalars=fake) as tracker:
        parts = build_parts(family, s.family, arch)
        parts.source.v_parameterization = s.v_parameterization
        with _offload_observed(tracker):
            measure = _run(s, family, parts, tracker, notes)
    return measure


class _offload_observed:
    """While a plan runs: what the offloading switches put in host memory leaves the tracker's count, and
    what they bring to the device is tagged (library.memory.OFFLOAD_OBSERVERS)."""

    def __init__(self, tracker: MemoryTracker):
        self.tracker = tracker

    def observe(self, tensor, where: str) -> None:
        if where == "host":
            self.tracker.release([tensor])
        else:  # weights and optimizer state come over on block swap's side stream; activations do not
            self.tracker.arrive([tensor], where, "main" if where == "activations" else "swap")

    def __enter__(self):
        from library.memory import OFFLOAD_OBSERVERS

        OFFLOAD_OBSERVERS.append(self.observe)
        return self

    def __exit__(self, *exc):
        from library.memory import OFFLOAD_OBSERVERS

        OFFLOAD_OBSERVERS.remove(self.observe)


def _run(s: StepSettings, family, parts, tracker: MemoryTracker, notes: list[str]) -> StepMeasure:
    from library.block_swap import make_swapper
    from library.memory import (cast_frozen_parts, cast_trainable, enable_gradient_checkpointing, offload_checkpoints,
                                set_attention, store_fp8_base, weight_dtype)
    from library.offload import OneAtATime
    from library.planner.quantized import planned_linear
    from library.quantization import quantize_base, store_t5
    from library.objectives import LossOptions
    from library.training import batch_loss

    modules = [parts.denoiser, parts.vae, *parts.text_encoders.values()]
    for module in modules:
        module.requires_grad_(False)
    if s.recipe == "network" and quantize_base(parts, s.base_model_precision, weight_dtype(s.mixed_precision),
                                               keep_t5=s.t5xxl_precision != "auto", make_layer=planned_linear):
        notes.append(f"base_model_precision {s.base_model_precision}: bitsandbytes' storage of every frozen Linear "
                     f"(library/planner/quantized.py: its kernels do not run on fake tensors)")

    # ---- what trains ------------------------------------------------------------------------
    adapted, text_encoders = [], []
    if s.recipe == "network":
        from networks.settings import NetworkSettings
        from networks.targets import inject

        settings = NetworkSettings.from_network_section(s.network)
        wanted = {"denoiser": s.train_unet}
        for target in family.adapter_targets(parts):
            if wanted.get(target.component, s.train_text_encoder):
                module = parts.denoiser if target.component == "denoiser" else parts.text_encoders[target.component]
                adapted.append(inject(module, target, settings))
        trained = [p for c in adapted for p in c.parameters()]
    else:
        parts.denoiser.requires_grad_(True)
        text_encoders = list(parts.text_encoders.values()) if s.train_text_encoder else []
        for encoder in text_encoders:
            encoder.requires_grad_(True)
        trained = [p for m in [parts.denoiser, *text_encoders] for p in m.parameters()]
    train_te = any(c.target.component != "denoiser" for c in adapted) or bool(text_encoders)

    # ---- memory switches --------------------------------------------------------------------
    dtype = weight_dtype(s.mixed_precision)
    cast_frozen_parts(parts, dtype, s.no_half_vae)
    if s.full_fp16 or s.full_bf16:
        cast_trainable(trained, dtype)  # train_db: module.to(dtype) on the trained modules: the same casts
    set_attention(parts.denoiser, False, s.sdpa)
    if s.gradient_checkpointing:
        enable_gradient_checkpointing(parts.denoiser, [c.module for c in adapted if c.module is not parts.denoiser]
                                      if s.recipe == "network" else text_encoders)
    if s.t5xxl_precision == "int8":  # bitsandbytes kernels do not run on fake tensors
        notes.append("t5xxl_precision int8 planned as 1-byte weights (fp8 storage; LLM.int8's fp32 row scales "
                     "add 4 bytes per output row)")
    store_t5(parts, "fp8" if s.t5xxl_precision == "int8" else s.t5xxl_precision, dtype)
    if s.fp8_base:
        store_fp8_base(parts.denoiser, dtype)
    if s.cpu_offload_checkpointing:
        offload_checkpoints(parts.denoiser)
    swapper = make_swapper(family, parts, s.blocks_to_swap, "cpu", trained=s.recipe == "db")
    if swapper:
        notes.append(f"blocks_to_swap {s.blocks_to_swap}: {swapper.bytes_swapped() / 2**30:.2f} GiB of weights in "
                     f"CPU memory, copied to the device and back every step ({_swap_seconds(swapper):.1f} s/step "
                     f"of PCIe copies at 25 GB/s)")
    trained_ids = {id(p) for p in trained}
    for module in modules:
        for t in _storages(module):
            tracker.tag([t], "adapter weights" if id(t) in trained_ids and s.recipe == "network" else "weights")
    frozen = sum(p.numel() for m in modules for p in m.parameters() if id(p) not in trained_ids)

    # ---- pre-encoding, placed as library.training.cache_outputs places it: the VAE alone (leaving once the
    # latents are cached); cached text encoders one at a time (library.offload), others to stay; no denoiser yet
    denoiser_storages = list(_storages(parts.denoiser))
    tracker.release(denoiser_storages)
    text_modules = list(parts.text_encoders.values())
    text_cached = s.cache_text_encoder_outputs and not train_te
    tracker.release([t for m in text_modules for t in _storages(m)])
    pixels = torch.zeros(s.batch_size, 3, s.height, s.width)
    captions = ["a photo"] * s.batch_size
    tracker.set_phase("encode")
    with tracker.window("vae"), torch.no_grad(), _autocast(s.mixed_precision):
        latents = family.encode_images(parts, pixels)
    if s.cache_latents:
        tracker.release(_storages(parts.vae))
    else:
        del latents
    if text_cached:
        notes.append("text encoders visit the device one at a time while captions are encoded; then stay on the CPU")
    else:
        for module in text_modules:
            tracker.arrive(_storages(module), "weights")
    placement = OneAtATime(text_modules, "cpu") if text_cached else contextlib.nullcontext()
    with placement, tracker.window("text"), torch.no_grad(), _autocast(s.mixed_precision):
        conditioning = family.encode_prompts(parts, captions, s.clip_skip)
    cached = {"a photo": {k: v[:1] for k, v in conditioning.items()}} if text_cached else None
    del conditioning
    if s.cache_latents:
        notes.append("kept on the CPU while training (latents cached): vae")
    for t in denoiser_storages:  # the recipes move the denoiser over after the caches are built
        if swapper and swapper.swaps(t):  # ... except swapped weights (block_swap.move)
            continue
        tracker.arrive([t], "adapter weights" if id(t) in trained_ids and s.recipe == "network" else "weights")

    # ---- optimizer ----------------------------------------------------------------------------
    for p in trained:  # registered before the optimizer's own hooks: sees each gradient before a fused step
        p.register_post_accumulate_grad_hook(lambda p: tracker.tag([p.grad], "gradients"))
    optimizer, optimizers = _optimizer(s, adapted, parts, text_encoders, trained, notes)
    fused = s.fused_backward_pass or bool(s.fused_optimizer_groups)
    if swapper and fused:
        swapper.optimizer_state = optimizer.state_of

    warm_up_state(trained, optimizers, swapper, tracker)

    # ---- the training steps ------------------------------------------------------------------
    generator = torch.Generator().manual_seed(0)
    objective = family.objective(parts)
    batch = {"caption": captions, "loss_weight": torch.ones(s.batch_size)}
    if s.cache_latents:
        batch["latents"] = latents
    else:
        batch["pixels"] = pixels
    for module in modules:
        module.train()
    with tracker.window("step"):
        for _ in range(STEPS):
            tracker.set_phase("forward")
            with _autocast(s.mixed_precision):
                loss = batch_loss(family, parts, objective, batch, s.clip_skip, generator, cached, train_te,
                                  LossOptions())
            tracker.set_phase("backward")
            loss.backward()
            del loss
            tracker.set_phase("optimizer")
            with_grads = [p for p in trained if p.grad is not None]
            if not fused and s.max_grad_norm > 0 and with_grads:
                torch.nn.utils.clip_grad_norm_(with_grads, s.max_grad_norm)
            optimizer.step()
            for opt in optimizers:
                tracker.tag([t for state in opt.state.values() for t in state.values()
                             if isinstance(t, torch.Tensor)], "optimizer state")
            optimizer.zero_grad(set_to_none=True)
            tracker.set_phase("idle")
    if fused:
        optimizer.remove_hooks()
    if s.sample:
        sample_phase(s, family, parts, latents if s.cache_latents else None, tracker, notes)
    host = host_bytes(s, parts, swapper, text_cached)
    return StepMeasure(tracker, dict(tracker.windows), notes, trainable=sum(p.numel() for p in trained),
                       frozen=frozen, host=host)


def sample_phase(s: StepSettings, family, parts, latents, tracker: MemoryTracker, notes: list[str]) -> None:
    """Sampling between steps, placed as library/sampling.py places it (library/offload.py visiting): with the
    training state on the device (weights, optimizer state), the text encoders kept elsewhere come over to
    encode one prompt and leave before the denoiser runs one inference step at the training size
    (classifier-free guidance doubles its batch, except FLUX.1's distilled guidance); then the VAE comes to
    decode. The text encoders are counted together (the run brings them one at a time: an upper bound)."""
    def away(module) -> bool:
        return not any(id(t.untyped_storage()) in tracker.by_storage for t in _storages(module))

    encoders = [m for m in parts.text_encoders.values() if away(m)]
    vae_away = away(parts.vae)
    tracker.set_phase("sample")
    with tracker.window("sample"), torch.no_grad(), _autocast(s.mixed_precision):
        for module in encoders:
            tracker.arrive(_storages(module), "weights")
        conditioning = family.encode_prompts(parts, ["a photo"] * (1 if s.family == "flux" else 2), s.clip_skip)
        for module in encoders:
            tracker.release(_storages(module))
        if vae_away:
            tracker.arrive(_storages(parts.vae), "weights")
        if latents is None:
            latents = family.encode_images(parts, torch.zeros(1, 3, s.height, s.width))
        noisy = torch.zeros((len(next(iter(conditioning.values()))), *latents.shape[1:]), dtype=latents.dtype)
        conditioning = family.conditioning_for_batch(parts, {}, conditioning, noisy)
        if vae_away:
            tracker.release(_storages(parts.vae))  # it leaves while the denoiser runs
        prediction = family.predict(parts, noisy, torch.full((noisy.shape[0],), 500.0), conditioning)
        del prediction
        if vae_away:
            tracker.arrive(_storages(parts.vae), "weights")
        parts.vae.decode(noisy[:1].to(next(parts.vae.parameters()).dtype))
        if vae_away:
            tracker.release(_storages(parts.vae))


def host_bytes(s: StepSettings, parts, swapper, text_cached: bool) -> dict[str, int]:
    """Host memory the run holds while training (besides what loading the checkpoints takes): parts kept on
    the CPU, block swap's host copies (pinned) and the optimizer state of swapped weights."""
    def size(module):
        return sum(t.numel() * t.element_size() for t in _storages(module))

    out = {}
    if s.cache_latents:
        out["vae (latents cached)"] = size(parts.vae)
    if text_cached:
        out["text encoders (outputs cached)"] = sum(size(m) for m in parts.text_encoders.values())
    if s.ema:  # torch's AveragedModel of the denoiser as loaded (fp32), on the CPU
        out["EMA copy (fp32)"] = sum(p.numel() * 4 for p in parts.denoiser.parameters())
    if swapper is not None:
        out["block swap: weights (pinned)"] = swapper.bytes_swapped()
        out["block swap: optimizer state"] = sum(t.numel() * t.element_size() for t in swapper.state_host.values())
    return out


def warm_up_state(trained, optimizers, swapper, tracker: MemoryTracker) -> None:
    """The optimizer state as the first step leaves it, made by the optimizers' own step on a zero gradient,
    one parameter at a time (a full set of gradients never exists here, as it need not in a fused backward
    pass): the steady state one measured step then runs in. State of block-swapped weights goes to the host,
    where block swap keeps it between uses."""
    from library.memory import device_copy

    owner = {id(p): opt for opt in optimizers for group in opt.param_groups for p in group["params"]}
    with torch.no_grad():
        for p in trained:
            opt = owner.get(id(p))
            if opt is None:
                continue
            swapped = swapper is not None and swapper.swaps(p)
            if swapped:  # a swapped weight steps while its block is on the device (library/block_swap.py)
                p.data = device_copy(swapper.host[p], p.device)
            p.grad = torch.zeros_like(p)
            opt.step()
            p.grad = None
            state = opt.state.get(p, {})
            tracker.tag([t for t in state.values() if isinstance(t, torch.Tensor)], "optimizer state")
            if swapped:
                _back_to_host(swapper, p, state)


def _back_to_host(swapper, p, state: dict) -> None:
    """What block swap does after a swapped weight's step: the weight copied back to its host buffer, its
    optimizer state moved to host buffers."""
    from library.memory import host_copy

    host_copy(p.data, out=swapper.host[p])
    p.data = swapper.host[p]
    for key, value in list(state.items()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            state[key] = swapper.state_host[(id(p), key)] = host_copy(value)


def _swap_seconds(swapper, bandwidth: float = 25e9) -> float:
    """PCIe time of one step's swapping: each swapped block comes over twice (forward, backward's re-run);
    trained weights also go back once."""
    trained = sum(t.numel() * t.element_size() for p, t in swapper.host.items() if p.requires_grad)
    return (2 * swapper.bytes_swapped() + trained) / bandwidth


def _optimizer(s: StepSettings, adapted, parts, text_encoders, trained, notes):
    from library.optim import FusedBackward, build_optimizer

    if s.recipe == "network":
        from networks import blockwise
        from networks.settings import NetworkSettings

        settings = NetworkSettings.from_network_section(s.network)
        n = s.network
        groups = blockwise.param_groups(adapted, settings, n.unet_lr, n.text_encoder_lr, s.learning_rate)
    else:
        groups = [{"params": list(parts.denoiser.parameters()), "lr": s.learning_rate}]
        for encoder in text_encoders:
            groups.append({"params": list(encoder.parameters()), "lr": s.learning_rate})
    name = s.optimizer_type
    eight_bit = name.lower() in EIGHT_BIT
    build = None
    if eight_bit:
        notes.append(f"{name}: bitsandbytes kernels do not run on fake tensors; its state is allocated from "
                     f"bitsandbytes' documented layout (uint8 moments + one fp32 absmax per 256 values for "
                     f"tensors of 4096+ values, fp32 moments below that)")

        def build(_name, groups, _lr, _args):  # the layout of bitsandbytes' state, also per fused chunk
            return Bnb8bitLayout(groups, moments=EIGHT_BIT[name.lower()])
    if s.fused_backward_pass or s.fused_optimizer_groups:
        optimizer = FusedBackward(name, groups, s.learning_rate, s.optimizer_args, chunks=s.fused_optimizer_groups,
                                  max_grad_norm=s.max_grad_norm, build=build)
        return optimizer, optimizer.optimizers
    if build:
        optimizer = build(name, groups, s.learning_rate, s.optimizer_args)
        return optimizer, [optimizer]
    optimizer = build_optimizer(name, groups, s.learning_rate, s.optimizer_args)
    return optimizer, [optimizer]


EIGHT_BIT = {"adamw8bit": 2, "pagedadamw8bit": 2, "lion8bit": 1, "pagedlion8bit": 1}


class Bnb8bitLayout(torch.optim.Optimizer):
    """bitsandbytes' 8-bit blockwise optimizer state, allocated as bitsandbytes allocates it (state1/state2
    uint8 of the parameter's shape, absmax1/absmax2 fp32 per block of 256; parameters under 4096 values:
    fp32 states), without its CUDA kernels. The update itself works in place (no temporaries)."""

    BLOCK, MIN_8BIT = 256, 4096

    def __init__(self, groups, moments: int):
        super().__init__(groups, {"lr": 1e-4})
        self.moments = moments

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ARG002
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    small = p.numel() < self.MIN_8BIT
                    for i in range(1, self.moments + 1):
                        state[f"state{i}"] = torch.zeros_like(p, dtype=torch.float32 if small else torch.uint8)
                        if not small:
                            state[f"absmax{i}"] = torch.zeros((p.numel() + self.BLOCK - 1) // self.BLOCK,
                                                              dtype=torch.float32, device=p.device)


def _autocast(mixed_precision: str):
    """accelerate's autocast for the precision (on the faked device: CPU autocast with CUDA's policy)."""
    if mixed_precision == "no":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.float16 if mixed_precision == "fp16" else torch.bfloat16)
