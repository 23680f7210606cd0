"""Which shipped architecture a config plans, without its files: model.arch, else model.family, else the
checkpoint when it is on disk, else a known model name in model.pretrained_model_name_or_path. A config whose
family cannot be told is a config error (a plan of the wrong model would be worse than none)."""
from __future__ import annotations

import re
from pathlib import Path

from library.config import ConfigError

# shipped architecture -> family
ARCH_FAMILY = {"sd15": "sd1", "sd2": "sd1", "sdxl": "sdxl", "sd3-medium": "sd3", "sd3.5-medium": "sd3",
               "sd3.5-large": "sd3", "flux-dev": "flux", "flux-schnell": "flux", "chroma": "chroma",
               "flux2-klein-4b": "flux2", "flux2-klein-9b": "flux2", "flux2-dev": "flux2", "qwen-image": "qwen_image",
               "qwen-image-edit": "qwen_image", "qwen-image-edit-2511": "qwen_image", "zimage": "zimage",
               "anima": "anima"}
# the architecture a family plans when nothing says more
FAMILY_ARCH = {"sd1": "sd15", "sdxl": "sdxl", "sd3": "sd3-medium", "flux": "flux-dev", "chroma": "chroma",
               "flux2": "flux2-klein-4b", "qwen_image": "qwen-image", "zimage": "zimage", "anima": "anima"}
# known model names (hub ids, release file names), first match wins: pattern -> shipped architecture
KNOWN_NAMES = [
    (r"qwen[-_ ]?image[-_ ]?edit[-_ ]?2511", "qwen-image-edit-2511"),
    (r"qwen[-_ ]?image[-_ ]?edit", "qwen-image-edit"),
    (r"qwen[-_ ]?image", "qwen-image"),
    (r"z[-_ ]?image", "zimage"),
    (r"anima(?!gine)", "anima"),  # not SDXL's Animagine
    (r"schnell", "flux-schnell"),
    (r"chroma", "chroma"),
    (r"klein[-_ ]?(base[-_ ]?)?9b", "flux2-klein-9b"),
    (r"klein", "flux2-klein-4b"),
    (r"flux[-_. ]?2", "flux2-dev"),
    (r"flux", "flux-dev"),
    (r"(sd|stable-diffusion-)3\.5[-_ ]?large", "sd3.5-large"),
    (r"(sd|stable-diffusion-)3\.5[-_ ]?medium", "sd3.5-medium"),
    (r"sd3|stable-diffusion-3", "sd3-medium"),
    (r"xl|pony|illustrious|animagine", "sdxl"),
    (r"v2-1|v2-0|sd2|stable-diffusion-2|768-v", "sd2"),
    (r"v1-5|v1-4|sd15|sd-v1|sd1|stable-diffusion-v1", "sd15"),
]


def resolve(model) -> tuple[str, str]:
    """(family, architecture: a shipped name or a folder of configs) of a config's [model] section."""
    if model.arch:
        return _family_of_arch(model), model.arch
    name = model.pretrained_model_name_or_path
    known = _known_name(name)
    if model.family != "auto":
        if known and ARCH_FAMILY[known] == model.family:
            return model.family, known
        return model.family, "sd2" if model.family == "sd1" and model.v2 else FAMILY_ARCH[model.family]
    if Path(name).exists():
        from library.families import get_family

        family = get_family("auto", name).name
        if known and ARCH_FAMILY[known] == family:
            return family, known
        return family, "sd2" if family == "sd1" and model.v2 else FAMILY_ARCH[family]
    if known:
        return ARCH_FAMILY[known], "sd2" if known == "sd15" and model.v2 else known
    raise ConfigError(_unknown(name))


def _family_of_arch(model) -> str:
    if model.arch in ARCH_FAMILY:
        return ARCH_FAMILY[model.arch]
    if model.family != "auto":
        return model.family
    if Path(model.arch).is_dir():
        from library.families import get_family

        try:
            return get_family("auto", model.arch).name
        except ValueError:
            pass
    known = _known_name(model.arch)
    if known:
        return ARCH_FAMILY[known]
    raise ConfigError(f"'model.arch' = {model.arch!r} is neither a shipped architecture ({', '.join(ARCH_FAMILY)}) "
                      f"nor a folder whose family can be told: set 'model.family' too")


def _known_name(name: str) -> str | None:
    text = Path(name).name.lower()  # the file or repository name, not the folders it is in
    for pattern, arch in KNOWN_NAMES:
        if re.search(pattern, text):
            return arch
    return None


def _unknown(name: str) -> str:
    return (f"cannot tell which model {name!r} is (the file is not here to look at, and the name is not a known "
            f"one): set 'model.arch' to one of {', '.join(ARCH_FAMILY)} (or 'model.family' to one of "
            f"{', '.join(FAMILY_ARCH)}). Known names: Qwen-Image (Edit, Edit-2511), Z-Image, FLUX.2 klein 4B / 9B / "
            f"dev, Chroma, FLUX.1 dev / schnell, SD3 / SD3.5 medium / large, SDXL (sd_xl, Pony, Illustrious, "
            f"Animagine), SD2 (v2-1, 768-v), SD1.5 (v1-5)")
