"""Prompt files for samples, as sd-scripts users write them, read and checked when the run starts (a bad line
stops the run then, not hours later). Imports no torch: the config check reads the file.

  .txt   one prompt a line, `#` comments; flags: --n negative prompt, --w width, --h height, --d seed,
         --s steps, --l CFG scale, --g guidance (FLUX), --ss sampler, --ci control (reference) image of an
         edit model (FLUX.1 Kontext), as musubi-tuner writes it
  .toml  [prompt] defaults and [[prompt.subset]] entries with prompt, negative_prompt, width, height,
         seed, sample_steps, scale, guidance_scale, sample_sampler, control_image
  .json  a list of prompt strings (with flags) or of such tables
"""
from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

SAMPLERS = ("ddim", "euler", "euler_a", "k_euler", "k_euler_a", "dpmsolver++", "dpmsolver", "k_dpm_2",
            "k_dpm_2_a", "lms", "k_lms", "heun", "pndm", "dpmsingle")


class PromptFileError(Exception):
    """A prompt file line that cannot be sampled; names the file and line."""


@dataclass(frozen=True)
class SamplePrompt:
    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    steps: int | None = None
    scale: float = 7.5
    guidance: float | None = None
    sampler: str | None = None
    control_image: str | None = None


FLAGS = {"n": ("negative_prompt", str), "w": ("width", int), "h": ("height", int), "d": ("seed", int),
         "s": ("steps", int), "l": ("scale", float), "g": ("guidance", float), "ss": ("sampler", str),
         "ci": ("control_image", str)}
TOML_KEYS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "width": "width", "height": "height",
             "seed": "seed", "sample_steps": "steps", "scale": "scale", "guidance_scale": "guidance",
             "sample_sampler": "sampler", "control_image": "control_image"}


def read_prompt_file(path: str | Path) -> list[SamplePrompt]:
    """Every prompt of a .txt / .toml / .json prompt file, checked; PromptFileError names the file and entry."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise PromptFileError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                              f"save it as UTF-8") from None
    if path.suffix.lower() == ".toml":
        prompts = _from_toml(text, path)
    elif path.suffix.lower() == ".json":
        prompts = _from_json(text, path)
    else:
        prompts = [parse_line(line, f"{path}:{number}") for number, line in enumerate(text.splitlines(), 1)
                   if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise PromptFileError(f"{path}: no prompts")
    return prompts


def _from_toml(text: str, path: Path) -> list[SamplePrompt]:
    try:
        data = tomllib.loads(text).get("prompt", {})
    except tomllib.TOMLDecodeError as e:
        raise PromptFileError(f"{path}: not valid TOML: {e}") from None
    subsets = data.get("subset", []) if isinstance(data, dict) else None
    if not isinstance(subsets, list) or not all(isinstance(s, dict) for s in subsets):
        raise PromptFileError(f"{path}: expected a [prompt] table with [[prompt.subset]] entries")
    defaults = {k: v for k, v in data.items() if k != "subset"}
    return [_from_dict({**defaults, **subset}, f"{path}: subset {i + 1}") for i, subset in enumerate(subsets)]


def _from_json(text: str, path: Path) -> list[SamplePrompt]:
    try:
        entries = json.loads(text)
    except ValueError as e:
        raise PromptFileError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(entries, list):
        raise PromptFileError(f"{path}: expected a list of prompts (strings or objects), got a "
                              f"{type(entries).__name__}")
    prompts = []
    for i, entry in enumerate(entries):
        where = f"{path}: entry {i + 1}"
        if not isinstance(entry, (str, dict)):
            raise PromptFileError(f"{where}: expected a prompt string or an object, got {entry!r}")
        prompts.append(parse_line(entry, where) if isinstance(entry, str) else _from_dict(entry, where))
    return prompts


def parse_line(line: str, where: str) -> SamplePrompt:
    """'a dog --n blurry --w 768 --d 5' -> SamplePrompt; an unknown flag or a bad number is an error."""
    prompt, *flags = re.split(r"\s--", " " + line.strip())
    values = {}
    for flag in flags:
        name, _, value = flag.strip().partition(" ")
        if name not in FLAGS:
            raise PromptFileError(f"{where}: unknown flag --{name} (known: {', '.join('--' + f for f in FLAGS)})")
        field, kind = FLAGS[name]
        values[field] = _convert(value.strip(), kind, f"{where}: --{name}")
    return _checked(SamplePrompt(prompt.strip(), **values), where)


def _from_dict(entry: dict, where: str) -> SamplePrompt:
    unknown = sorted(set(entry) - set(TOML_KEYS))
    if unknown:
        raise PromptFileError(f"{where}: unknown key(s) {unknown} (known: {', '.join(TOML_KEYS)})")
    values = {TOML_KEYS[k]: v for k, v in entry.items()}
    for key in ("prompt", "negative_prompt", "sampler", "control_image"):
        if key in values and not isinstance(values[key], str):
            raise PromptFileError(f"{where}: {key} must be a string, got {values[key]!r}")
    for key, kind in (("width", int), ("height", int), ("seed", int), ("steps", int), ("scale", float),
                      ("guidance", float)):
        if key in values:
            values[key] = _convert(str(values[key]), kind, f"{where}: {key}")
    return _checked(SamplePrompt(**values), where)


def _convert(value: str, kind: type, where: str):
    try:
        return kind(value)
    except (ValueError, TypeError):
        raise PromptFileError(f"{where}: {value!r} is not {'an integer' if kind is int else 'a number'}") from None


def _checked(p: SamplePrompt, where: str) -> SamplePrompt:
    if not p.prompt:
        raise PromptFileError(f"{where}: empty prompt")
    for name in ("width", "height"):
        value = getattr(p, name)
        if value is not None and (value < 8 or value % 8):
            raise PromptFileError(f"{where}: {name} {value} must be a positive multiple of 8")
    if p.steps is not None and p.steps < 1:
        raise PromptFileError(f"{where}: steps must be at least 1")
    if p.control_image is not None and not Path(p.control_image).is_file():
        raise PromptFileError(f"{where}: control image {p.control_image} not found")
    if p.sampler is not None and p.sampler not in SAMPLERS:
        raise PromptFileError(f"{where}: sampler {p.sampler!r} is not one of {', '.join(SAMPLERS)}")
    return p


