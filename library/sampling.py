"""Preview images during training.

A prompt file is read and checked when the run starts (a bad line stops the run then, not hours later).
Sampling uses the model being trained as it is (adapters active, no copy), brings the text encoders and
the VAE to the device only while it needs them when training keeps them elsewhere, runs under
inference mode, and leaves everything as it found it: RNG states, train/eval modes, device placement.
So a run with sampling gives the same losses as one without.

Prompt files, as sd-scripts users write them:
  .txt   one prompt a line, `#` comments; flags: --n negative prompt, --w width, --h height, --d seed,
         --s steps, --l CFG scale, --g guidance (FLUX), --ss sampler
  .toml  [prompt] defaults and [[prompt.subset]] entries with prompt, negative_prompt, width, height,
         seed, sample_steps, scale, guidance_scale, sample_sampler
  .json  a list of prompt strings (with flags) or of such dicts
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from library.phases import during
from library.prompts import SAMPLERS, SamplePrompt, read_prompt_file  # noqa: F401  (SAMPLERS: the choice list)


def make_sampler(name: str, training_scheduler, objective):
    """An inference scheduler built from the training schedule, predicting what the model predicts."""
    import diffusers

    classes = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "k_euler": "EulerDiscreteScheduler",
               "euler_a": "EulerAncestralDiscreteScheduler", "k_euler_a": "EulerAncestralDiscreteScheduler",
               "dpmsolver++": "DPMSolverMultistepScheduler", "dpmsolver": "DPMSolverMultistepScheduler",
               "dpmsingle": "DPMSolverSinglestepScheduler", "k_dpm_2": "KDPM2DiscreteScheduler",
               "k_dpm_2_a": "KDPM2AncestralDiscreteScheduler", "lms": "LMSDiscreteScheduler",
               "k_lms": "LMSDiscreteScheduler", "heun": "HeunDiscreteScheduler", "pndm": "PNDMScheduler"}
    extra = {"algorithm_type": name} if name in ("dpmsolver++", "dpmsolver") else {}
    cls = getattr(diffusers, classes[name])
    return cls.from_config(training_scheduler.config, prediction_type=objective.prediction_type, **extra)


def run_pipeline(pipe, prompt: str, negative_prompt: str, width: int, height: int, steps: int, seed: int,
                 guidance_scale: float, **family_kwargs):
    """One image from a diffusers pipeline built over the training parts, seeded on the CPU."""
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt, negative_prompt=negative_prompt or None, width=width, height=height,
                num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator,
                **family_kwargs).images[0]


@dataclass(frozen=True)
class SampleSettings:
    """[sample] with the run's defaults filled in."""
    prompts: tuple[SamplePrompt, ...]
    width: int
    height: int
    steps: int
    sampler: str
    seed: int
    clip_skip: int
    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    at_first: bool = False
    at_end: bool = True
    tiled_vae: bool = False  # sample.sample_tiled_vae


def settings_from_config(cfg, width: int, height: int) -> SampleSettings | None:
    """The sampling plan of a run, or None without sample_prompts. Reads and checks the prompt file."""
    s = cfg.sample
    if not s.sample_prompts:
        return None
    return SampleSettings(tuple(read_prompt_file(s.sample_prompts)), width, height, s.sample_steps, s.sample_sampler,
                          s.sample_seed, cfg.model.clip_skip, s.sample_every_n_steps, s.sample_every_n_epochs,
                          s.sample_at_first, tiled_vae=s.sample_tiled_vae)


def due(settings: SampleSettings | None, step: int, epoch_end: int | None = None) -> bool:
    """Whether to sample now: after optimizer step `step`, or at the end of epoch `epoch_end`."""
    if settings is None:
        return False
    if epoch_end is not None:
        return bool(settings.every_n_epochs) and epoch_end % settings.every_n_epochs == 0
    return bool(settings.every_n_steps) and step % settings.every_n_steps == 0


@during("sampling")
def render_samples(family, parts, settings: SampleSettings, out_dir: Path, tag: str, device=None) -> list[Path]:
    """Render every prompt to out_dir/<tag>_<index>_<seed>.png, plus <tag>_grid.png for several prompts.
    RNG states, train/eval modes and device placement are restored afterwards. The training step's cached
    blocks are given back to the card before (and sampling's after: library.memory.release_cached_blocks)."""
    from library.block_swap import move
    from library.memory import release_cached_blocks
    from library.offload import visiting

    out_dir.mkdir(parents=True, exist_ok=True)
    modules = [parts.denoiser, parts.vae, *parts.text_encoders.values()]
    saved = [(m, m.training, _device_of(m)) for m in modules]
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    device = device or _device_of(parts.denoiser)
    paths, images = [], []
    largest = max(max(p.width or settings.width, p.height or settings.height) for p in settings.prompts)
    recorded = parts.extra.get(PROMPT_OUTPUTS)  # the sample prompts encoded while caching: no encoder comes
    visitors = [m for m in modules[1:] if recorded is None or not recorded.replays(m)]
    release_cached_blocks()
    try:
        for m in modules:
            m.eval()
        move(parts.denoiser, device)  # where training keeps it (a block swapper keeps swapping)
        with torch.inference_mode(), visiting(visitors, device, parts.denoiser), \
                recorded.replaying() if recorded else nullcontext(), vae_tiles(parts.vae, largest, settings.tiled_vae):
            for index, p in enumerate(settings.prompts):
                seed, image = _render(family, parts, settings, index, p)
                paths.append(_save_png(image, out_dir / f"{tag}_{index:02d}_{seed}.png"))
                images.append(image)
        if len(images) > 1:
            paths.append(_save_png(grid(images), out_dir / f"{tag}_grid.png"))
    finally:
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        for m, mode, where in saved:
            m.train(mode)
            move(m, where)
        release_cached_blocks()
    return paths


def _render(family, parts, settings: SampleSettings, index: int, p: SamplePrompt):
    """(seed, image) of prompt `p`, the index-th of the settings."""
    seed = p.seed if p.seed is not None else settings.seed + index
    reference = {"control_image": p.control_image} if p.control_image else {}  # edit models only
    return seed, family.sample(parts, p.prompt, p.width or settings.width, p.height or settings.height,
                               p.steps or settings.steps, seed, p.sampler or settings.sampler, settings.clip_skip,
                               p.negative_prompt, p.scale, p.guidance, **reference)


PROMPT_OUTPUTS = "sample prompt outputs"  # parts.extra: a PromptOutputs, recorded while caching


class _Encoded(Exception):
    """The denoiser was reached: the prompts are encoded (PromptOutputs.record stops the pipeline there)."""


class PromptOutputs:
    """The outputs of the text encoders whose outputs are cached (kept in host memory while training), for the
    sample prompts: recorded once while the captions are cached (run.cache_outputs, the encoders visiting the
    device then), replayed while sampling, so that sampling never brings those encoders to the device, as
    sd-scripts and musubi-tuner encode sample prompts up front. Recording runs each prompt through the family's
    own sampling pipeline (every family's prompt handling: negative prompts, guidance, clip_skip, lengths) and
    stops it at the denoiser's first call; each encoder call is keyed by its inputs (token ids and masks, by
    value), so replaying answers the very calls the pipeline makes then, with the very outputs (in host memory,
    sent to the device asked for). A call not recorded runs the encoder after all, on the device for the call."""

    def __init__(self, encoders: list[torch.nn.Module]):
        self.encoders = encoders
        self.outputs: dict[tuple, object] = {}  # (encoder index, inputs' key) -> output, in host memory

    def replays(self, module: torch.nn.Module) -> bool:
        return any(module is e for e in self.encoders)

    def record(self, family, parts, settings: SampleSettings, autocast) -> None:
        """Every prompt of `settings` through the family's sampling, under the run's `autocast`, as far as the
        denoiser."""
        def keep(index: int):
            def hook(module, args, kwargs, output):  # noqa: ARG001
                self.outputs[(index, _key(args, kwargs))] = _moved(output, "cpu")
            return hook

        def stop(module, args):  # noqa: ARG001
            raise _Encoded

        handles = [e.register_forward_hook(keep(i), with_kwargs=True) for i, e in enumerate(self.encoders)]
        handles.append(parts.denoiser.register_forward_pre_hook(stop))
        try:
            for index, p in enumerate(settings.prompts):
                try:
                    with torch.inference_mode(), autocast:
                        _render(family, parts, settings, index, p)
                except _Encoded:
                    pass
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def replaying(self):
        """While inside, the encoders answer from the recording (their forward replaced; restored after)."""
        for index, encoder in enumerate(self.encoders):
            encoder.forward = self._replay(index, encoder, encoder.forward)
        try:
            yield
        finally:
            for encoder in self.encoders:
                del encoder.forward  # the class's forward again

    def _replay(self, index: int, encoder, forward):
        def replayed(*args, **kwargs):
            device = next((t.device for t in _tensors_in((args, kwargs))), torch.device("cpu"))
            output = self.outputs.get((index, _key(args, kwargs)))
            if output is not None:
                return _moved(output, device)
            encoder.to(device)  # not recorded (a prompt changed since): computed where the call is
            try:
                return forward(*args, **kwargs)
            finally:
                encoder.to("cpu")
        return replayed


def _tensors_in(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors_in(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors_in(v)


def _key(args, kwargs) -> tuple:
    """The inputs of an encoder call, by value: tensors by dtype, shape and bytes; the rest by repr."""
    def one(value):
        if isinstance(value, torch.Tensor):
            data = value.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            return ("tensor", str(value.dtype), tuple(value.shape), bytes(data.numpy()))
        if isinstance(value, (list, tuple)):
            return tuple(one(v) for v in value)
        if isinstance(value, dict):
            return tuple((k, one(v)) for k, v in sorted(value.items()))
        return repr(value)
    return one(args), one(kwargs)


def _moved(value, device):
    """`value` (a tensor, or lists / tuples / dicts / transformers' model outputs of them) with every tensor on
    `device`, the containers' types kept."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_moved(v, device) for v in value)
    if isinstance(value, dict):
        return type(value)(**{k: _moved(v, device) for k, v in value.items()})
    return value


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


TILING = ("use_tiling", "tile_sample_min_size", "tile_latent_min_size", "tile_sample_min_height",
          "tile_sample_min_width", "tile_sample_stride_height", "tile_sample_stride_width")  # diffusers' VAEs'


def vae_tile(largest_side: int, tiled: bool) -> int:
    """The tile (px) samples of `largest_side` px decode in: with sample_tiled_vae 512 px (256 px for images of
    512 px and less, so that they tile too); else whole images (0), except that images over 1024 px decode in
    the VAE's own tile size (-1)."""
    if tiled:
        return 512 if largest_side > 512 else 256
    return -1 if largest_side > 1024 else 0


@contextmanager
def vae_tiles(vae, largest_side: int, tiled: bool):
    """While inside, the VAE decodes in overlapping tiles (diffusers' VAE tiling: a quarter of a tile
    overlaps, blended) as vae_tile says; its tiling settings are restored afterwards, so the training encoder
    path is left untouched."""
    tile = vae_tile(largest_side, tiled)
    saved = {name: getattr(vae, name) for name in TILING if hasattr(vae, name)}
    try:
        if tile and hasattr(vae, "enable_tiling"):
            vae.enable_tiling()
        if tile > 0 and hasattr(vae, "tile_latent_min_size"):  # AutoencoderKL, AutoencoderKLFlux2
            vae.tile_sample_min_size = tile
            vae.tile_latent_min_size = tile // 2 ** (len(vae.config.block_out_channels) - 1)
        elif tile > 0 and hasattr(vae, "tile_sample_min_height"):  # AutoencoderKLQwenImage
            vae.enable_tiling(tile, tile, tile * 3 // 4, tile * 3 // 4)
        yield
    finally:
        for name, value in saved.items():
            setattr(vae, name, value)


def _save_png(image, path: Path) -> Path:
    tmp = path.with_name("." + path.name + ".tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)
    return path


def grid(images: list, columns: int | None = None):
    """Images side by side, `columns` per row (default: up to 4), each cell the size of the largest."""
    from PIL import Image

    columns = columns or min(4, len(images))
    rows = -(-len(images) // columns)
    w, h = max(i.width for i in images), max(i.height for i in images)
    sheet = Image.new("RGB", (columns * w, rows * h), "white")
    for k, image in enumerate(images):
        sheet.paste(image, ((k % columns) * w, (k // columns) * h))
    return sheet


def log_images(accelerator, paths: list[Path], step: int) -> None:
    """Send the samples to the trackers that take images: tensorboard gets one tag per prompt
    (samples/00, samples/01, ...), wandb one list."""
    if not accelerator.trackers:
        return
    import numpy as np
    from PIL import Image

    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths if not p.name.endswith("_grid.png")]
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({f"samples/{i:02d}": a[None] for i, a in enumerate(arrays)}, step=step,
                               dataformats="NHWC")
        elif hasattr(tracker, "log_images"):
            tracker.log_images({"samples": arrays}, step=step)
