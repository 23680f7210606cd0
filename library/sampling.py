"""Preview images: the sampler schedulers users name, and rendering a prompt file with the model as
it is being trained (adapters active, no copy)."""
from __future__ import annotations

from pathlib import Path

import torch

SAMPLERS = ("ddim", "euler", "euler_a")


def make_sampler(name: str, training_scheduler, objective):
    """An inference scheduler built from the training schedule, predicting what the model predicts."""
    from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

    cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "euler_a": EulerAncestralDiscreteScheduler}[name]
    return cls.from_config(training_scheduler.config, prediction_type=objective.prediction_type)


def read_prompts(path: str) -> list[str]:
    """One prompt a line; empty lines and lines starting with '#' are skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def render_samples(family, parts, prompts: list[str], out_dir: Path, tag: str, width: int, height: int,
                   steps: int, seed: int, sampler: str, clip_skip: int) -> list[Path]:
    """Render each prompt (seed, seed+1, ...) to out_dir/<tag>_<index>_<seed>.png; training state is kept:
    the torch RNG and each module's train/eval mode are restored afterwards."""
    out_dir.mkdir(parents=True, exist_ok=True)
    modules = [parts.denoiser, parts.vae, *parts.text_encoders.values()]
    modes = [m.training for m in modules]
    rng = torch.get_rng_state()
    paths = []
    try:
        for m in modules:
            m.eval()
        with torch.no_grad():
            for i, prompt in enumerate(prompts):
                image = family.sample(parts, prompt, width, height, steps, seed + i, sampler, clip_skip)
                path = out_dir / f"{tag}_{i:02d}_{seed + i}.png"
                tmp = path.with_name(path.name + ".tmp.png")
                image.save(tmp)
                tmp.replace(path)
                paths.append(path)
    finally:
        torch.set_rng_state(rng)
        for m, mode in zip(modules, modes):
            m.train(mode)
    return paths
