"""Class images for prior preservation: the ones in the folder are used; when there are fewer than asked
for, the rest are generated once with the base model (before any training) and saved there with the
class prompt as their caption, so later runs reuse them. Existing files are never touched."""
from __future__ import annotations

from pathlib import Path

import torch

from library.data.images import IMAGE_EXTENSIONS
from library.offload import visiting
from library.phases import during


@during("class images")
def ensure_class_images(family, parts, folder: str | Path, prompt: str, count: int, size: tuple[int, int],
                        steps: int, sampler: str, seed: int, clip_skip: int, say=print, device="cpu") -> int:
    """Generate class images until `folder` holds `count`; returns how many were generated. The denoiser
    works on `device`; the VAE and the text encoders visit it one at a time; all are on the host afterwards.
    The caller's autocast (the run's precision) applies."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    existing = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS]
    missing = count - len(existing)
    if missing <= 0:
        return 0
    say(f"prior preservation: generating {missing} class images of {prompt!r} in {folder}")
    modules = [parts.denoiser, parts.vae, *parts.text_encoders.values()]
    modes = [m.training for m in modules]
    rng = torch.get_rng_state()
    index = 0
    parts.denoiser.to(device)
    try:
        with torch.no_grad(), visiting(modules[1:], device, parts.denoiser):
            for m in modules:
                m.eval()
            for generated in range(missing):
                while (folder / f"class_{index:05d}.png").exists() or (folder / f"class_{index:05d}.txt").exists():
                    index += 1
                image = family.sample(parts, prompt, size[0], size[1], steps, seed + index, sampler, clip_skip)
                _write_atomic(folder / f"class_{index:05d}.png", lambda p: image.save(p, format="PNG"))
                _write_atomic(folder / f"class_{index:05d}.txt", lambda p: p.write_text(prompt, encoding="utf-8"))
                index += 1
    finally:
        for m in modules:  # each comes back when training needs it
            m.to("cpu")
    torch.set_rng_state(rng)
    for m, mode in zip(modules, modes):
        m.train(mode)
    return missing


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    write(tmp)
    tmp.replace(path)
