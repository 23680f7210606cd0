"""Augmentations (flip_aug, color_aug, random_crop) and the seeded random source behind them and behind
the caption transforms.

Each training example draws from its own generator, seeded by (seed, epoch, entry, purpose): the same run
seed gives the same flips, crops, colors and captions whatever the batch order, the DataLoader workers or
the other options (turning on flip_aug does not change the captions drawn).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

HUE_SHIFT = 0.05  # color_aug: hue shifted by up to +-5% of the color circle (+-18 degrees)


@dataclass(frozen=True)
class AugmentSettings:
    flip_aug: bool
    color_aug: bool
    random_crop: bool
    alpha_mask: bool


def example_rng(seed: int, epoch: int, entry: int, purpose: str) -> random.Random:
    """The random source of one example's `purpose` ("caption", "flip", "crop", "color")."""
    return random.Random(f"{seed}/{epoch}/{entry}/{purpose}")


def draws_flip(settings: AugmentSettings, rng: random.Random) -> bool:
    return settings.flip_aug and rng.random() < 0.5


def crop_offset_draw(rng: random.Random):
    """random_crop: a function (free_x, free_y) -> (left, top) drawing a uniform crop position."""
    return lambda free_x, free_y: (rng.randint(0, free_x), rng.randint(0, free_y))


def hue_shift(rng: random.Random):
    """color_aug: a function shifting the hue of an RGB image by an amount drawn now."""
    shift = round(rng.uniform(-HUE_SHIFT, HUE_SHIFT) * 256)

    def apply(image: Image.Image) -> Image.Image:
        hsv = np.asarray(image.convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + shift) % 256
        return Image.fromarray(hsv, "HSV").convert("RGB")

    return apply
