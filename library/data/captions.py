"""Captions: reading the caption file of an image, and the per-example caption transforms sd-scripts users
know (keep_tokens, keep_tokens_separator, shuffle_caption, tag dropout, caption dropout, prefix / suffix).

A caption is split into tags at `caption_separator`. The first `keep_tokens` tags stay in place; with
`keep_tokens_separator` in the caption ("a, b ||| c, d ||| e"), the tags before it stay in place, the tags
after a second one stay at the end, and only the middle ones move. Shuffling and tag dropout touch only the
movable tags. caption_prefix / caption_suffix are joined before / after and never shuffled or dropped; whole-
caption dropout (caption_dropout_rate, every N epochs) empties the caption, prefix and suffix included.
Every random choice comes from the `rng` passed in, so a seed gives the same captions on every run.
"""
from __future__ import annotations

import codecs
import math
import random
from dataclasses import dataclass
from pathlib import Path

BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


@dataclass(frozen=True)
class CaptionRecipe:
    shuffle_caption: bool
    keep_tokens: int
    keep_tokens_separator: str
    caption_separator: str
    caption_prefix: str | None
    caption_suffix: str | None
    caption_dropout_rate: float
    caption_tag_dropout_rate: float
    caption_dropout_every_n_epochs: int
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0

    @property
    def is_fixed(self) -> bool:
        """True if a caption always renders the same (so text-encoder outputs can be cached)."""
        return not (self.shuffle_caption or self.caption_dropout_rate or self.caption_tag_dropout_rate
                    or self.caption_dropout_every_n_epochs or self.token_warmup_step)


def read_caption(image: Path, extension: str, class_tokens: str | None) -> tuple[str | None, str | None]:
    """(caption, problem): the caption file's text, else the class tokens; or None and why not."""
    caption_file = image.with_suffix(extension)
    if not caption_file.is_file():
        if class_tokens:
            return class_tokens, None
        return None, f"no caption file {caption_file.name} and no class tokens (from a folder name or class_tokens)"
    text, problem = decode_caption(caption_file.read_bytes())
    if problem:
        return None, f"caption file {caption_file.name} {problem}"
    if not text:
        return None, f"caption file {caption_file.name} is empty"
    return text, None


def decode_caption(data: bytes) -> tuple[str | None, str | None]:
    """(text, problem) of a caption file's bytes: UTF-8, with or without a BOM; UTF-16 with a BOM; UTF-16
    without a BOM when its NUL bytes say so (ASCII tags in UTF-16-LE are "a\0b\0"). Any other NUL byte is a
    problem, never a character of the caption."""
    encoding = next((name for bom, name in BOMS if data.startswith(bom)), None) or _bomless_utf16(data) or "utf-8"
    try:
        text = data.decode(encoding).strip()
    except UnicodeDecodeError as e:
        what = "UTF-8" if encoding == "utf-8" else encoding.upper()
        return None, f"is not {what} (byte 0x{data[e.start]:02x} at offset {e.start})"
    if "\0" in text:
        return None, (f"holds NUL bytes (offset {data.index(0)}): not UTF-8 text (UTF-16 or another encoding? "
                      f"save it as UTF-8)")
    return text, None


def _bomless_utf16(data: bytes) -> str | None:
    """"utf-16-le" / "utf-16-be" if the NUL bytes of `data` sit only at odd / even offsets, in more than half of
    its 16-bit units (mostly ASCII / Latin-1 text), else None."""
    if len(data) < 2 or len(data) % 2 or 0 not in data:
        return None
    even, odd, units = data[0::2].count(0), data[1::2].count(0), len(data) // 2
    if even == 0 and 2 * odd > units:
        return "utf-16-le"
    if odd == 0 and 2 * even > units:
        return "utf-16-be"
    return None


def render_caption(text: str, recipe: CaptionRecipe, rng: random.Random, epoch: int,
                   step: int | None = None, max_steps: int = 0) -> str:
    """The caption one training example sees in `epoch` (1-based, as the training loop counts); `step` (the
    optimizer steps done before its batch) and `max_steps` for token warmup."""
    every = recipe.caption_dropout_every_n_epochs
    if every and epoch % every == 0:
        return ""
    if recipe.caption_dropout_rate and rng.random() < recipe.caption_dropout_rate:
        return ""
    until = warmup_until(recipe, max_steps)
    body = _transform_tags(text, recipe, rng, step if step is not None and step < until else None, until)
    affixes = [_clean_affix(recipe.caption_prefix, recipe), body, _clean_affix(recipe.caption_suffix, recipe)]
    return _joiner(recipe).join(part for part in affixes if part)


def warmup_until(recipe: CaptionRecipe, max_steps: int) -> int:
    """sd-scripts' token warmup lasts token_warmup_step steps (a fraction below 1: of max_steps); 0: none."""
    until = recipe.token_warmup_step
    return math.floor(until * max_steps) if until < 1 else int(until)


def _transform_tags(text: str, recipe: CaptionRecipe, rng: random.Random, step: int | None = None,
                    until: int = 0) -> str:
    """Tag dropout and shuffling of the movable tags; during token warmup (`step` below `until`) only the first
    floor(step * (movable - token_warmup_min) / until) + token_warmup_min of them, as sd-scripts cuts them."""
    sep = recipe.keep_tokens_separator
    moving = recipe.shuffle_caption or recipe.caption_tag_dropout_rate or step is not None
    if not moving and not (sep and sep in text):
        return text  # nothing to do: the caption is used exactly as written
    head, middle, tail = split_kept_tags(text, recipe)
    if step is not None:
        middle = middle[:math.floor(step * ((len(middle) - recipe.token_warmup_min) / until)) + recipe.token_warmup_min]
    if recipe.caption_tag_dropout_rate:
        middle = [tag for tag in middle if rng.random() >= recipe.caption_tag_dropout_rate]
    if recipe.shuffle_caption:
        rng.shuffle(middle)
    return _joiner(recipe).join(head + middle + tail)


def split_kept_tags(text: str, recipe: CaptionRecipe) -> tuple[list[str], list[str], list[str]]:
    """(tags kept at the front, tags that may move or drop, tags kept at the end)."""
    sep = recipe.keep_tokens_separator
    if sep and sep in text:
        front, rest = text.split(sep, 1)
        middle, back = rest.split(sep, 1) if sep in rest else (rest, "")
        return _tags(front, recipe), _tags(middle, recipe), _tags(back, recipe)
    tags = _tags(text, recipe)
    return tags[:recipe.keep_tokens], tags[recipe.keep_tokens:], []


def _tags(text: str, recipe: CaptionRecipe) -> list[str]:
    return [t.strip() for t in text.split(recipe.caption_separator) if t.strip()]


def _joiner(recipe: CaptionRecipe) -> str:
    sep = recipe.caption_separator
    return sep if sep.endswith(" ") else sep + " "


def _clean_affix(affix: str | None, recipe: CaptionRecipe) -> str:
    return (affix or "").strip().strip(recipe.caption_separator.strip() or " ").strip()
