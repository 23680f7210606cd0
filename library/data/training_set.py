"""The torch Dataset of a data plan, and collate.

An example is one entry of the plan (an image, one of its repeats), drawn in an epoch: the key the batch
sampler yields is (entry, epoch), and the example's random choices (caption transforms, flip, crop, hue)
come from a generator seeded by (seed, epoch, entry). A batch holds:

    caption          list of str
    image            list of str (the file)
    pixels           (B, 3, H, W) in [-1, 1]; or latents (B, C, h, w) once latents are cached
    mask             (B, 1, H, W) or (B, 1, h, w), alpha in [0, 1]; only with alpha_mask
    control_pixels   (B, 3, H, W) in [-1, 1]: each image's control image (same stem in the subset's
                     control_directory) resized and center-cropped to its bucket, flipped with it; only
                     with control_directory; control_latents instead once latents are cached
    loss_weight      (B,) prior_loss_weight for regularization images, 1 otherwise (denoising_loss's
                     sample_weights)
    original_size    (B, 2) (h, w) of the image as displayed, before resizing
    crop_top_left    (B, 2) (top, left) of the crop in the resized (and flipped) image
    target_size      (B, 2) (h, w) trained at (the bucket)
"""
from __future__ import annotations

import random
from pathlib import Path

import torch

from library.data.augment import crop_offset_draw, draws_flip, example_rng, hue_shift
from library.data.captions import render_caption
from library.data.control import control_pixels
from library.data.images import Crop, load_pixels, plan_crop
from library.data.masks import load_mask
from library.data.plan import DataPlan, ImageRecord

SIZE_FIELDS = ("original_size", "crop_top_left", "target_size")


class TrainingSet(torch.utils.data.Dataset):
    def __init__(self, plan: DataPlan, seed: int, prior_loss_weight: float):
        self.plan, self.seed, self.prior_loss_weight = plan, seed, prior_loss_weight
        self.items: list[ImageRecord] = plan.images
        self.entries: list[int] = plan.entries
        self.latents: dict[int, dict[str, torch.Tensor]] | None = None  # image -> cached tensors, in memory
        self.latent_files: dict[int, Path] | None = None  # ... or image -> cache file
        # token warmup (library/data/captions.py): (batches per epoch, batches per optimizer step, max steps), set by
        # library.training.prepare_data when a subset warms up; the sampler then adds each batch's index to its keys
        self.step_clock: tuple[int, int, int] | None = None

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def bucket_keys(self) -> list[tuple]:
        return self.plan.entry_keys

    @property
    def captions(self) -> list[str]:
        """Every caption an example can have, when captions are fixed (text-encoder caching)."""
        return sorted({self.fixed_caption(r) for r in self.items})

    def fixed_caption(self, record: ImageRecord) -> str:
        return render_caption(record.caption, record.subset.captions, random.Random(0), 1)

    @property
    def warms_up(self) -> bool:
        """Whether any caption warms up (token_warmup_step), so keys must carry their batch's position."""
        return any(r.subset.captions.token_warmup_step for r in self.items)

    def _step(self, epoch: int, batch: int | None) -> tuple[int | None, int]:
        """(optimizer steps done before this batch, max steps) for token warmup; (None, 0) without it."""
        if batch is None or self.step_clock is None:
            return None, 0
        per_epoch, per_step, max_steps = self.step_clock
        return ((epoch - 1) * per_epoch + batch) // per_step, max_steps

    def __getitem__(self, key) -> dict:
        entry, epoch, batch = (*key, None)[:3] if isinstance(key, tuple) else (key, 1, None)
        index = self.entries[entry]
        record = self.items[index]
        draw = lambda purpose: example_rng(self.seed, epoch, entry, purpose)  # noqa: E731
        flip = draws_flip(record.subset.augment, draw("flip"))
        example = {"caption": render_caption(record.caption, record.subset.captions, draw("caption"), epoch,
                                             *self._step(epoch, batch)),
                   "image": str(record.path),
                   "sample_weight": self.prior_loss_weight if record.subset.is_reg else 1.0}
        if self.latents is not None or self.latent_files is not None:
            crop = plan_crop(record.size, record.bucket)
            example.update(self.cached(index, flip))
        else:
            crop = self._random_crop(record, draw("crop"))
            color = hue_shift(draw("color")) if record.subset.augment.color_aug else None
            pixels, mask = load_pixels(record.path, record.orientation, crop, flip,
                                       record.subset.augment.alpha_mask, color)
            example["pixels"] = pixels
            if record.subset.mask_dir is not None:  # masked_loss: the mask image weights the loss
                mask = load_mask(record, crop, flip)
            if mask is not None:
                example["mask"] = mask
        if record.subset.control_dir is not None and "control_latents" not in example:
            example["control_pixels"] = control_pixels(record, flip)
        example.update(size_fields(record, crop, flip))
        return example

    def _random_crop(self, record: ImageRecord, rng: random.Random) -> Crop:
        return plan_crop(record.size, record.bucket, crop_offset_draw(rng) if record.subset.augment.random_crop
                         else None)

    def cached(self, index: int, flip: bool) -> dict:
        """latents (and mask) of image `index` from the cache, flipped variant if `flip`."""
        if self.latents is not None:
            tensors = self.latents[index]
        else:
            from safetensors.torch import load_file

            tensors = load_file(self.latent_files[index])
        suffix = "_flipped" if flip else ""
        out = {"latents": tensors["latents" + suffix].float()}
        if "control_latents" + suffix in tensors:
            out["control_latents"] = tensors["control_latents" + suffix].float()
        if "mask" + suffix in tensors:
            out["mask"] = tensors["mask" + suffix].float()
        return out

    def plain_example(self, index: int) -> dict:
        """Image `index` with no augmentation and its fixed caption (for evaluation)."""
        record = self.items[index]
        example = {"caption": self.fixed_caption(record)}
        if self.latents is not None or self.latent_files is not None:
            example.update(self.cached(index, False))
        else:
            example["pixels"] = load_pixels(record.path, record.orientation, plan_crop(record.size, record.bucket))[0]
        return example


def size_fields(record: ImageRecord, crop: Crop, flip: bool) -> dict:
    left = crop.resized[0] - crop.left - crop.target[0] if flip else crop.left
    return {"original_size": (record.size[1], record.size[0]), "crop_top_left": (crop.top, left),
            "target_size": (crop.target[1], crop.target[0])}


def collate(examples: list[dict]) -> dict:
    batch = {"caption": [e["caption"] for e in examples], "image": [e["image"] for e in examples]}
    for key in ("pixels", "latents", "control_pixels", "control_latents"):
        if key in examples[0]:
            batch[key] = torch.stack([e[key] for e in examples])
    masks = [e.get("mask") for e in examples]
    if any(m is not None for m in masks):
        like = next(m for m in masks if m is not None)
        batch["mask"] = torch.stack([m if m is not None else torch.ones_like(like) for m in masks])
    batch["loss_weight"] = torch.tensor([e["sample_weight"] for e in examples], dtype=torch.float32)
    for key in SIZE_FIELDS:
        batch[key] = torch.tensor([e[key] for e in examples], dtype=torch.long)
    return batch


def latent_mask(batch: dict, latents: torch.Tensor) -> torch.Tensor | None:
    """The batch's alpha mask at the latents' size (area-averaged), for denoising_loss(mask=...)."""
    mask = batch.get("mask")
    if mask is None:
        return None
    mask = mask.to(latents.device, torch.float32)
    if mask.shape[-2:] != latents.shape[-2:]:
        mask = torch.nn.functional.interpolate(mask, size=latents.shape[-2:], mode="area")
    return mask
