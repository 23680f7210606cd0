"""The training step of a config, run for the planner: the model built from its architecture configs
(no weights), the recipe's adapters, memory switches, optimizer and batch_loss: the optimizer state as the
first step leaves it (warm_up_state), then one measured step (forward, backward, optimizer step).

What trains, the memory switches and the optimizer are built by library/run.py's functions, the ones both
recipes call (add_adapters / train_whole, apply_switches, make_optimizer), in the recipes' order: what trains
-> switches -> pre-encoding (VAE, text encoders) -> optimizer -> batch_loss, backward, clipping, optimizer
step, zero_grad. A switch that does not save what it should shows in the plan. The placement while caching
is followed here with the tracker (run.cache_outputs moves modules; the fake device counts storages).
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from library.planner.tracker import FakeDevice, MemoryTracker
from library.run import OptimizerSettings, Switches

STEPS = 1  # measured steps, after warm_up_state (a plan's time is its number of operators)


@dataclass(kw_only=True)
class StepSettings(Switches, OptimizerSettings):
    """What of a config the memory depends on (the planner's search changes these): the run's memory switches
    and optimizer settings (library/run.py), and what the planned step is made of."""
    recipe: str  # "network" or "db"
    family: str
    arch: str  # a shipped architecture name or a folder of configs
    width: int
    height: int
    batch_size: int = 1
    cache_latents: bool = False
    cache_text_encoder_outputs: bool = False
    train_text_encoder: bool = True  # db: dreambooth.train_text_encoder; network: not network_train_unet_only
    train_unet: bool = True  # network: not network_train_text_encoder_only
    clip_skip: int = 1
    v_parameterization: bool = False
    sample: bool = False  # sample.sample_prompts: sampling during training
    sample_tiled_vae: bool = False  # sample.sample_tiled_vae: samples decoded in tiles
    ema: bool = False  # dreambooth.use_ema: an EMA copy of the denoiser in host memory (train_db.py)
    class_images: bool = False  # db: prior preservation generates class images (dreambooth.class_prompt ...)
    bucket_areas: tuple = ()  # other bucket sizes' areas over width x height (enable_bucket): fragmentation
    network: object = None  # the config's [network] section (adapter recipe)
    processes: int = 1  # several processes under DDP (library/engines.py): each holds its gradient buckets
    ddp_gradient_as_bucket_view: bool = False
    sharding: object = None  # library.planner.sharding.Sharding: ZeRO / FSDP2 over N processes (plan.py applies it)

    def switches(self) -> Switches:
        """The run's memory switches as planned: xformers is SDPA, and an int8 / nf4 text encoder is left to
        library/planner/quantized.py's stand-in layers (bitsandbytes kernels do not run on fake tensors)."""
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(Switches)}
        quantized = self.t5xxl_precision in ("int8", "nf4")
        return Switches(**{**own, "xformers": False, "torch_compile": False,
                           "t5xxl_precision": "auto" if quantized else self.t5xxl_precision})

    def optimizer_settings(self) -> OptimizerSettings:
        return OptimizerSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(OptimizerSettings)})


@dataclass
class StepMeasure:
    tracker: MemoryTracker
    phases: dict[str, object]  # window name -> Peak
    notes: list[str]
    trainable: int = 0
    frozen: int = 0
    host: dict = field(default_factory=dict)  # what -> bytes of host memory the run holds


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
        with tracker.host_by_default():  # loaded on the host, as a run loads it
            parts = family.planning_parts(arch)
        parts.source.v_parameterization = s.v_parameterization
        with _offload_observed(tracker) as observed:
            measure = _run(s, family, parts, tracker, notes, observed)
    return measure


class _offload_observed:
    """While a plan runs: what the offloading switches put in host memory leaves the tracker's count, and
    what they bring to the device is tagged (library.memory.OFFLOAD_OBSERVERS)."""

    def __init__(self, tracker: MemoryTracker):
        self.tracker = tracker
        self.buffers: set[int] = set()  # ids of the parts' buffers (moved with their module)

    def observe(self, tensor, where: str) -> None:
        if where == "empty_cache":
            self.tracker.empty_cache()
        elif where == "host":
            self.tracker.release([tensor])
        elif where == "module weights":  # a module moved over whole (library.offload), on the compute stream
            self.tracker.arrive([tensor], "weights", "main")
        else:  # a module's own tensors are moved on the compute stream (library/run.py, library/offload.py);
            # block swap's copies of weights and optimizer state come over on its side stream
            moved = isinstance(tensor, torch.nn.Parameter) or id(tensor) in self.buffers
            self.tracker.arrive([tensor], where, "main" if moved or where == "activations" else "swap")

    def __enter__(self):
        from library.memory import OFFLOAD_OBSERVERS

        OFFLOAD_OBSERVERS.append(self.observe)
        return self

    def __exit__(self, *exc):
        from library.memory import OFFLOAD_OBSERVERS

        OFFLOAD_OBSERVERS.remove(self.observe)


def _run(s: StepSettings, family, parts, tracker: MemoryTracker, notes: list[str],
         observed: _offload_observed) -> StepMeasure:
    """The run's phases in its order: class images (train_db with prior preservation, from the base model as
    loaded), the setup on the host, caching and placement, the training step, sampling, saving."""
    if s.recipe == "db" and s.class_images:
        class_image_phase(s, family, parts, tracker)
    with tracker.host_by_default():  # what trains and the switches are set up before anything is placed
        trained, adapted, text_encoders, swapper = _setup(s, family, parts, notes)
    train_te = any(c.target.component != "denoiser" for c in adapted) or bool(text_encoders)
    modules = [parts.denoiser, parts.vae, *parts.text_encoders.values()]
    trained_ids = {id(p) for p in trained}
    frozen = sum(p.numel() for m in modules for p in m.parameters() if id(p) not in trained_ids)

    # ---- placement and caches: library/run.py's cache_outputs and place_denoiser, as the recipes call them ----
    observed.buffers = {id(b) for m in modules for b in m.buffers()}
    placed = _place_and_cache(s, family, parts, train_te, tracker, notes)
    if s.recipe == "network":  # arrived as weights: the adapters' records say what they are
        tracker.tag(trained, "adapter weights")
    training_state = _train_step(s, family, parts, placed, trained, adapted, text_encoders, swapper, train_te,
                                 tracker, notes)  # noqa: F841  (the optimizer state stays while sampling and saving)
    if s.sample:
        sample_phase(s, family, parts, placed.latents if s.cache_latents else None, tracker, notes)
    host = host_bytes(s, parts, swapper, placed.kept)
    host_state = getattr(training_state[0], "host_state", None)
    if host_state is not None:
        host["optimizer state (offload_optimizer_state)"] = host_state.host_bytes()
    host.update(save_phase(s, family, parts, adapted, tracker, notes))
    return StepMeasure(tracker, dict(tracker.windows), notes, trainable=sum(p.numel() for p in trained),
                       frozen=frozen, host=host)


def _setup(s: StepSettings, family, parts, notes: list[str]):
    """What trains, and the memory switches: library/run.py, as the recipes call it. Returns (trained
    parameters, adapted components, trained text encoders, the block swapper or None)."""
    from library.planner.quantized import planned_linear, store_text_encoders
    from library.run import add_adapters, apply_switches, quantize_frozen, train_whole

    if s.recipe == "network" and quantize_frozen(parts, s.switches(), make_layer=planned_linear):
        notes.append(f"base_model_precision {s.base_model_precision}: bitsandbytes' storage of every frozen Linear "
                     f"(library/planner/quantized.py: its kernels do not run on fake tensors)")
    adapted, text_encoders = [], []
    if s.recipe == "network":
        from networks.settings import NetworkSettings

        adapted = add_adapters(family, parts, NetworkSettings.from_network_section(s.network), s.train_unet,
                               s.train_text_encoder)
        trained = [p for c in adapted for p in c.parameters()]
        checkpointed = [c.module for c in adapted if c.module is not parts.denoiser]
    else:
        text_encoders = train_whole(parts, s.train_text_encoder)
        trained = [p for m in [parts.denoiser, *text_encoders] for p in m.parameters()]
        checkpointed = text_encoders
    swapper = apply_switches(family, parts, s.switches(), trained, checkpointed, "cpu", s.recipe == "db").swapper
    notes += store_text_encoders(parts, s.t5xxl_precision, s.mixed_precision)
    if swapper:
        notes.append(f"blocks_to_swap {s.blocks_to_swap}: {swapper.bytes_swapped() / 2**30:.2f} GiB of weights in "
                     f"CPU memory, copied to the device and back every step ({_swap_seconds(swapper):.1f} s/step "
                     f"of PCIe copies at 25 GB/s)")
    return trained, adapted, text_encoders, swapper


def _train_step(s: StepSettings, family, parts, placed, trained, adapted, text_encoders, swapper, train_te: bool,
                tracker: MemoryTracker, notes: list[str]) -> tuple:
    """The optimizer (its state as the first step leaves it), DDP's buckets, then the measured step (window
    "step"): batch_loss, backward, clipping, the optimizer step, zero_grad. Returns what stays on the device
    after it (the optimizers, DDP's buckets)."""
    from library.objectives import LossOptions
    from library.training import batch_loss

    for p in trained:  # registered before the optimizer's own hooks: sees each gradient before a fused step
        p.register_post_accumulate_grad_hook(lambda p: tracker.tag([p.grad], "gradients"))
    optimizer, optimizers = _optimizer(s, adapted, parts, text_encoders, swapper, notes)
    fused = s.optimizer_settings().fused
    warm_up_state(trained, optimizers, swapper, tracker, getattr(optimizer, "host_state", None))
    buckets = ddp_buckets(s, trained, tracker, notes)  # alive through the steps, as in a run

    generator = torch.Generator().manual_seed(0)
    objective = family.objective(parts)
    batch = {"caption": placed.captions, "loss_weight": torch.ones(s.batch_size)}
    if s.cache_latents:
        batch["latents"] = placed.latents
    else:
        batch["pixels"] = placed.pixels
    for module in [parts.denoiser, parts.vae, *parts.text_encoders.values()]:
        module.train()
    with tracker.window("step"):
        for _ in range(STEPS):
            tracker.set_phase("forward")
            with _autocast(s.mixed_precision):
                loss = batch_loss(family, parts, objective, batch, s.clip_skip, generator, placed.cached, train_te,
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
    return optimizer, optimizers, buckets


@dataclass
class _Placed:
    """What the planned caching leaves for the step: the planned batch and its caches."""
    pixels: torch.Tensor
    captions: list[str]
    latents: torch.Tensor | None = None  # cached latents of the batch (cache_latents)
    cached: dict | None = None  # cached conditioning (run.cache_outputs' return)
    kept: list = field(default_factory=list)  # the parts training keeps in host memory


def _place_and_cache(s: StepSettings, family, parts, train_te: bool, tracker: MemoryTracker,
                     notes: list[str]) -> _Placed:
    """Every part starts in host memory, as loaded; then library/run.py's cache_outputs (the VAE, and the text
    encoders one at a time, visiting for the caches; the others placed to stay) and place_denoiser, with
    planned caches of one batch: window "vae" encodes its latents, window "text" its captions. What a run
    encodes inside every step instead (nothing cached) is measured after the caching, with what it placed."""
    from library.run import Caches, cache_outputs, place_denoiser

    tracker.release([t for m in [parts.denoiser, parts.vae, *parts.text_encoders.values()] for t in _storages(m)])
    tracker.set_phase("encode")
    placed = _Placed(torch.zeros(s.batch_size, 3, s.height, s.width), ["a photo"] * s.batch_size)

    def latents() -> None:
        with tracker.window("vae"), torch.no_grad():
            placed.latents = family.encode_images(parts, placed.pixels)

    def text(apart, device) -> dict:  # noqa: ARG001  (one device here)
        from library.memory import host_copy

        with tracker.window("text"), torch.no_grad():
            encoded = family.encode_apart(parts, placed.captions) if apart else \
                family.encode_prompts(parts, placed.captions, s.clip_skip)
        return {placed.captions[0]: {k: host_copy(v[:1]) for k, v in encoded.items()}}  # kept on the host

    text_cached = s.cache_text_encoder_outputs and (not train_te or family.cached_apart is not None)
    caches = Caches(latents if s.cache_latents else None, text if text_cached else None)
    placed.cached = cache_outputs(family, parts, caches, not train_te, "cpu", notes.append)
    if not s.cache_latents:  # the VAE encodes inside every step
        with tracker.window("vae"), torch.no_grad(), _autocast(s.mixed_precision):
            family.encode_images(parts, placed.pixels)
    if not text_cached:  # the text encoders too
        with tracker.window("text"), torch.no_grad(), _autocast(s.mixed_precision):
            family.encode_prompts(parts, placed.captions, s.clip_skip)
    place_denoiser(parts, "cpu")
    placed.kept = ([parts.vae] if s.cache_latents else []) + [
        m for name, m in parts.text_encoders.items()
        if text_cached and (name == family.cached_apart if train_te else True)]
    return placed


def sample_phase(s: StepSettings, family, parts, latents, tracker: MemoryTracker, notes: list[str]) -> None:
    """Sampling between steps, placed as library/sampling.py places it: the training step's cached blocks given
    back before and after (library.memory.release_cached_blocks), one image at the training size (_one_image)
    with the training state on the device (weights, optimizer state), decoded in tiles with sample_tiled_vae
    (library.sampling.vae_tiles)."""
    from library.memory import release_cached_blocks

    tracker.set_phase("sample")
    with tracker.window("sample"), torch.no_grad(), _autocast(s.mixed_precision):
        release_cached_blocks()
        _one_image(s, family, parts, latents, tracker, tiled=s.sample_tiled_vae,
                   recorded=s.cache_text_encoder_outputs)
        release_cached_blocks()


def class_image_phase(s: StepSettings, family, parts, tracker: MemoryTracker) -> None:
    """Class images for prior preservation (library/prior.py, train_db before anything else): from the base model
    as loaded (before the switches cast it), under the run's autocast, one image at a time at the training size
    (_one_image) with the denoiser on the device; everything back on the host afterwards."""
    tracker.set_phase("class images")
    with tracker.window("class images"), torch.no_grad(), _autocast(s.mixed_precision):
        tracker.arrive(_storages(parts.denoiser), "weights")
        _one_image(s, family, parts, None, tracker, tiled=False)
        tracker.release(_storages(parts.denoiser))


def _one_image(s: StepSettings, family, parts, latents, tracker: MemoryTracker, tiled: bool,
               recorded: bool = False) -> None:
    """One image as library/sampling.py and library/prior.py make it, placed as they place the parts
    (library/offload.py visiting): the text encoders kept elsewhere come over one at a time to encode the
    prompt and leave, their cached blocks given back, before the denoiser runs one inference step at the
    training size (classifier-free guidance doubles its batch, except FLUX.1's distilled guidance); then the
    VAE comes to decode (in tiles when `tiled`). `recorded`: the sample prompts' outputs of the encoders kept
    elsewhere were recorded while caching (library.sampling.PromptOutputs): they come to the device, the
    encoders do not."""
    from library.memory import release_cached_blocks
    from library.offload import OneAtATime
    from library.sampling import vae_tiles

    def away(module) -> bool:
        return not any(id(t.untyped_storage()) in tracker.by_storage for t in _storages(module))

    encoders = [m for m in parts.text_encoders.values() if away(m)]
    vae_away = away(parts.vae)
    prompts = ["a photo"] * (1 if family.distilled_guidance else 2)  # classifier-free guidance: 2
    if encoders and recorded:  # computed on the host here: what arrives is the recorded outputs
        with tracker.host_by_default():
            conditioning = family.encode_prompts(parts, prompts, s.clip_skip)
        tracker.arrive([v for v in conditioning.values() if isinstance(v, torch.Tensor)], "activations")
    else:
        with OneAtATime(encoders, "cpu") if encoders else contextlib.nullcontext():
            conditioning = family.encode_prompts(parts, prompts, s.clip_skip)
    if encoders and not recorded:  # they leave when the denoiser runs, their cached blocks with them
        release_cached_blocks()
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
    decode_input = noisy[:1].to(next(parts.vae.parameters()).dtype)
    with vae_tiles(parts.vae, max(s.width, s.height), tiled):
        family.decode_latents(parts, decode_input)
    if vae_away:
        tracker.release(_storages(parts.vae))


def save_phase(s: StepSettings, family, parts, adapted, tracker: MemoryTracker, notes: list[str]) -> dict[str, int]:
    """Saving (window "save"), with the training state on the device: the tensors of the file as the recipes
    build them (a full fine-tune: family.single_file_state_dict, every weight copied to the host tensor by
    tensor and fused / renamed there; an adapter: networks.files.adapter_tensors), in host_by_default: what is
    built from device tensors counts on the device, the rest in host RAM. Returns the host RAM it adds (the
    file's tensors while written)."""
    from networks.files import adapter_tensors

    tracker.set_phase("save")
    with tracker.window("save"), tracker.host_by_default(), torch.no_grad():
        if s.recipe == "db":
            tensors = family.single_file_state_dict(parts)
        else:
            tensors, _ = adapter_tensors(adapted, "safetensors", torch.bfloat16)
        del tensors
    added = tracker.host_peaks["save"]
    if s.recipe == "db" and s.ema:
        notes.append("use_ema: the EMA file is built the same way after the model's, from the host copy (fp32)")
    what = "the file's tensors, built on the host" if s.recipe == "db" else "the adapter's tensors"
    return {f"saving: {what} (while written)": added} if added else {}


def host_bytes(s: StepSettings, parts, swapper, kept: list) -> dict[str, int]:
    """Host memory the run holds while training (besides what loading the checkpoints takes): parts kept on
    the CPU, block swap's host copies (pinned) and the optimizer state of swapped weights."""
    def size(module):
        return sum(t.numel() * t.element_size() for t in _storages(module))

    out = {}
    if s.cache_latents:
        out["vae (latents cached)"] = size(parts.vae)
    encoders = [m for m in kept if m is not parts.vae]
    if encoders:
        out["text encoders (outputs cached)"] = sum(size(m) for m in encoders)
    if s.ema:  # torch's AveragedModel of the denoiser as loaded (fp32), on the CPU
        out["EMA copy (fp32)"] = sum(p.numel() * 4 for p in parts.denoiser.parameters())
    if swapper is not None:
        out["block swap: weights (pinned)"] = swapper.bytes_swapped()
        out["block swap: optimizer state"] = sum(t.numel() * t.element_size() for t in swapper.state_host.values())
    return out


def warm_up_state(trained, optimizers, swapper, tracker: MemoryTracker, host_state=None) -> None:
    """The optimizer state as the first step leaves it, made by the optimizers' own step on a zero gradient,
    one parameter at a time (a full set of gradients never exists here, as it need not in a fused backward
    pass): the steady state one measured step then runs in. State of block-swapped weights goes to the host,
    where block swap keeps it between uses; with offload_optimizer_state (`host_state`, library.optim.HostState)
    every state goes to its host buffers, made here as the first step makes them."""
    from library.memory import device_copy

    owner = {id(p): (opt, group) for opt in optimizers for group in opt.param_groups for p in group["params"]}
    with torch.no_grad():
        for p in trained:
            opt, group = owner.get(id(p), (None, None))
            if opt is None:
                continue
            swapped = swapper is not None and swapper.swaps(p)
            if swapped:  # a swapped weight steps while its block is on the device (library/block_swap.py)
                p.data = device_copy(swapper.host[p], p.device)
            p.grad = torch.zeros_like(p)
            _step_one(opt, group, p)
            p.grad = None
            state = opt.state.get(p, {})
            tracker.tag([t for t in state.values() if isinstance(t, torch.Tensor)], "optimizer state")
            if swapped:
                _back_to_host(swapper, p, state)
            if host_state is not None:
                with tracker.host_by_default():
                    host_state.send_back(opt)


def _step_one(opt, group: dict, p) -> None:
    """`opt`'s step of parameter `p` alone: its group holds only `p` for the call (the optimizers look at every
    parameter of their groups each step: stepping ~1,000 adapters one by one would look at a million)."""
    everyone = group["params"]
    group["params"] = [p]
    try:
        opt.step()
    finally:
        group["params"] = everyone


def ddp_buckets(s: StepSettings, trained, tracker: MemoryTracker, notes: list[str]) -> list:
    """Several processes: each GPU holds DDP's all-reduce buckets, a flat copy of every trained gradient (per
    dtype), from the first backward to the end of the run, beside the gradients themselves; with
    ddp_gradient_as_bucket_view the gradients are views into the buckets, so nothing more. Returns them."""
    if s.processes < 2 or s.ddp_gradient_as_bucket_view:
        return []
    sizes: dict[tuple, int] = {}
    for p in trained:
        sizes[(p.device, p.dtype)] = sizes.get((p.device, p.dtype), 0) + p.numel()
    buckets = [torch.empty(n, dtype=dtype, device=device) for (device, dtype), n in sizes.items()]
    tracker.tag(buckets, "gradients")
    total = sum(b.numel() * b.element_size() for b in buckets)
    notes.append(f"DDP over {s.processes} processes: {total / 2**30:.2f} GiB of gradient buckets per GPU beside the "
                 f"gradients (ddp_gradient_as_bucket_view = true makes the gradients views into them)")
    return buckets


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


def _optimizer(s: StepSettings, adapted, parts, text_encoders, swapper, notes):
    """The recipes' optimizer (library/run.py make_optimizer), with bitsandbytes' 8-bit state laid out as it
    allocates it where its kernels cannot run on fake tensors."""
    from library.run import adapter_groups, make_optimizer, whole_model_groups

    if s.recipe == "network":
        from networks.settings import NetworkSettings

        groups = adapter_groups(adapted, NetworkSettings.from_network_section(s.network), s.network,
                                s.learning_rate)
    else:
        groups = whole_model_groups(parts.denoiser, text_encoders, s.learning_rate)
    name = s.optimizer_type
    build = None
    if name.lower() in EIGHT_BIT:
        notes.append(f"{name}: bitsandbytes kernels do not run on fake tensors; its state is allocated from "
                     f"bitsandbytes' documented layout (uint8 moments + one fp32 absmax per 256 values for "
                     f"tensors of 4096+ values, fp32 moments below that)")

        def build(_name, groups, _lr, _args):  # the layout of bitsandbytes' state, also per fused chunk
            return Bnb8bitLayout(groups, moments=EIGHT_BIT[name.lower()])
    return make_optimizer(s.optimizer_settings(), groups, swapper, build=build)


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
