"""Aspect-ratio buckets: the training sizes of a dataset, the size each image is trained at, and the batch
sampler that never puts two sizes in one batch.

With enable_bucket off every image is trained at `resolution` (scaled to cover it, cropped). With it on,
the bucket sizes are every (w, h) with both sides multiples of bucket_reso_steps within
[min_bucket_reso, max_bucket_reso] and w * h at most the area of `resolution` (for each width, the tallest
such height); an image goes to the bucket whose aspect ratio is closest to its own (ties: the larger
bucket). With bucket_no_upscale an image is never enlarged: it is scaled down only if it is larger than
the area of `resolution` (or a side exceeds max_bucket_reso), then its sides are rounded down to
multiples of bucket_reso_steps, which is its bucket.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass



@dataclass(frozen=True)
class BucketSettings:
    resolution: tuple[int, int]  # (w, h)
    enable_bucket: bool
    min_bucket_reso: int
    max_bucket_reso: int
    bucket_reso_steps: int
    bucket_no_upscale: bool


def bucket_sizes(s: BucketSettings) -> list[tuple[int, int]]:
    """The sizes images may be trained at, sorted by width."""
    if not s.enable_bucket:
        return [s.resolution]
    max_area, step = s.resolution[0] * s.resolution[1], s.bucket_reso_steps
    sizes = set()
    for w in range(s.min_bucket_reso, s.max_bucket_reso + 1, step):
        h = min(s.max_bucket_reso, max_area // w // step * step)
        if h >= s.min_bucket_reso:
            sizes.add((w, h))
    return sorted(sizes)


def choose_bucket(size: tuple[int, int], s: BucketSettings, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket an image of (w, h) `size` is trained at ((0, 0) if it is too small to fit any)."""
    if not s.enable_bucket:
        return s.resolution
    if s.bucket_no_upscale:
        return _unscaled_bucket(size, s)
    ratio = math.log(size[0] / size[1])
    return min(sizes, key=lambda b: (round(abs(math.log(b[0] / b[1]) - ratio), 9), -b[0] * b[1]))


def _unscaled_bucket(size: tuple[int, int], s: BucketSettings) -> tuple[int, int]:
    w, h = size
    max_area, step = s.resolution[0] * s.resolution[1], s.bucket_reso_steps
    scale = min(1.0, math.sqrt(max_area / (w * h)), s.max_bucket_reso / w, s.max_bucket_reso / h)
    return int(w * scale) // step * step, int(h * scale) // step * step


def upscale_factor(size: tuple[int, int], bucket: tuple[int, int]) -> float:
    """How much an image is enlarged to cover its bucket (1 or less: not enlarged)."""
    return max(bucket[0] / size[0], bucket[1] / size[1])


def bucket_table(keys: list[tuple], images_per_key: Counter, batch_sizes: dict) -> list[str]:
    """Printable lines: one per bucket, with images, entries (with repeats) and batches."""
    entries = Counter(keys)
    lines = []
    for key in sorted(entries):
        dataset, (w, h) = key
        batches = math.ceil(entries[key] / batch_sizes[key])
        lines.append(f"  dataset {dataset} bucket {w}x{h}: {images_per_key[key]} images, {entries[key]} entries "
                     f"-> {batches} batches of up to {batch_sizes[key]}")
    return lines


class BucketBatchSampler:
    """Batches of one bucket each; every entry once per epoch, in a seeded random order.

    The order is a torch RandomSampler permutation of all entries (drawn from `generator`); walking it,
    each entry joins its bucket's open batch, and a batch is yielded when it is full. Batches still open at
    the end of the epoch are yielded too, so a bucket smaller than the batch size still trains. With a
    single bucket this is exactly shuffle=True batching. Yields lists of (entry, epoch), epoch from 1.
    """

    def __init__(self, keys: list[tuple], batch_sizes: dict, generator: torch.Generator, shuffle: bool = True,
                 with_position: bool = False):
        self.keys, self.batch_sizes, self.generator, self.shuffle = keys, batch_sizes, generator, shuffle
        self.epoch = 0
        self.with_position = with_position  # (entry, epoch, batch index in the epoch): token warmup needs the step

    def __iter__(self):
        import torch  # here, not above: bucketing is part of the dataset check, which runs before torch loads

        self.epoch += 1
        if self.shuffle:
            order = list(torch.utils.data.RandomSampler(range(len(self.keys)), generator=self.generator))
        else:
            order = range(len(self.keys))
        open_batches: dict = {}
        batches = []
        for entry in order:
            key = self.keys[entry]
            batch = open_batches.setdefault(key, [])
            batch.append((entry, self.epoch))
            if len(batch) == self.batch_sizes[key]:
                batches.append(open_batches.pop(key))
        for index, batch in enumerate([*batches, *open_batches.values()]):
            yield [(*k, index) for k in batch] if self.with_position else batch

    def __len__(self) -> int:
        counts = Counter(self.keys)
        return sum(math.ceil(n / self.batch_sizes[k]) for k, n in counts.items())
