"""The data plan of a run, made before any model loads: the layout (dataset TOML or folders), every image
checked and given a caption and a bucket, the bad ones stopped on or skipped (dataset.bad_data), and the
examples of one epoch (images x repeats, regularization images balanced against them).

Regularization balance, as sd-scripts: each dataset's regularization images (is_reg) give as many examples
per epoch as its training images do (images x repeats), cycling through them in order (with their own
repeats first) when there are fewer, using the first ones when there are more. Their loss is weighted by
prior_loss_weight.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from library.config import Config
from library.data import DatasetError
from library.data.control import find_control, missing_control
from library.data.buckets import bucket_sizes, bucket_table, choose_bucket, upscale_factor
from library.data.captions import read_caption
from library.data.masks import mask_problem
from library.data.check import MAX_UPSCALE, Finding, empty_folder, find_duplicates, inspect_all
from library.data.dataset_config import DataLayout, SubsetSpec, read_layout
from library.data.images import CONVERSIONS, ImageHeader, conversion, list_images
from library.data.report import CountingBar


@dataclass
class ImageRecord:
    path: Path
    caption: str  # the caption file's text (or class tokens), before the per-example transforms
    size: tuple[int, int]  # (w, h) as displayed
    orientation: int
    has_alpha: bool
    dataset: int
    subset: SubsetSpec
    bucket: tuple[int, int]  # (w, h) it is trained at
    conversion: str | None = None  # how it becomes RGB (library.data.images.CONVERSIONS), None: plain RGB(A)

    @property
    def bucket_key(self) -> tuple:
        return (self.dataset, self.bucket)


@dataclass
class DataPlan:
    layout: DataLayout
    images: list[ImageRecord]
    entries: list[int]  # one per example of an epoch: an index into images
    findings: list[Finding] = field(default_factory=list)
    skipped: list[Finding] = field(default_factory=list)
    validation: list[ImageRecord] = field(default_factory=list)  # held out (train.validation_split)

    @property
    def entry_keys(self) -> list[tuple]:
        return [self.images[i].bucket_key for i in self.entries]

    @property
    def batch_sizes(self) -> dict:
        return {r.bucket_key: self.layout.datasets[r.dataset].batch_size for r in self.images}

    def batches_per_epoch(self) -> int:
        sizes = self.batch_sizes
        return sum(math.ceil(n / sizes[k]) for k, n in Counter(self.entry_keys).items())

    def steps_per_epoch(self, accumulation: int, processes: int = 1) -> int:
        """Optimizer steps in an epoch: each of the `processes` takes every processes-th batch (accelerate's
        sharding, the last ones padded from the start to an equal count), `accumulation` of them per step."""
        return math.ceil(math.ceil(self.batches_per_epoch() / processes) / accumulation)

    def summary(self, accumulation: int, processes: int = 1) -> list[str]:
        """The table printed before training: subsets, buckets, and the steps-per-epoch arithmetic."""
        per_subset = Counter(id(self.images[i].subset) for i in self.entries)
        lines = ["data:"]
        for d, dataset in enumerate(self.layout.datasets):
            for s in dataset.subsets:
                n = sum(r.subset is s for r in self.images)
                kind = "regularization" if s.is_reg else "training"
                lines.append(f"  {s.where}: {n} {kind} images x {s.num_repeats} repeats -> "
                             f"{per_subset[id(s)]} examples per epoch")
        lines += self.conversion_notes()
        lines += bucket_table(self.entry_keys, Counter(r.bucket_key for r in self.images), self.batch_sizes)
        batches = self.batches_per_epoch()
        shared = f", {math.ceil(batches / processes)} for each of {processes} processes" if processes > 1 else ""
        lines.append(f"  {len(self.entries)} examples per epoch in {batches} batches{shared}; gradient accumulation "
                     f"{accumulation} -> {self.steps_per_epoch(accumulation, processes)} steps per epoch")
        return lines


    def conversion_notes(self) -> list[str]:
        """One line per kind of image that is not plain 8-bit RGB(A), e.g. "3 images are 16-bit PNGs: ..."."""
        counts = Counter(r.conversion for r in self.images if r.conversion)
        lines = []
        for kind, (one, several, done) in CONVERSIONS.items():
            n = counts[kind]
            if n:
                lines.append(f"  {n} image is {one}: {done}" if n == 1 else f"  {n} images are {several}: {done}")
        return lines


def plan_data(cfg: Config, say=print) -> DataPlan:
    """Layout, check, captions, buckets and epoch entries; ConfigError / DatasetError before any model loads."""
    layout = read_layout(cfg)
    for note in layout.notes:
        say(f"note: {note}")
    records, findings = _scan(layout, cfg.dataset.check_decode)
    problems = [f for f in findings if f.problem]
    for f in findings:
        if not f.problem:
            say(f"note: {f}")
    if problems and cfg.dataset.bad_data == "stop":
        raise DatasetError(_problem_list(problems))
    for f in problems:
        say(f"warning: skipped {f}")
    bad = {f.path for f in problems}
    records = [r for r in records if r.path not in bad]
    if not any(not r.subset.is_reg for r in records):
        raise DatasetError(_nothing_found(layout, problems))
    records, held_out = split_validation(records, cfg.train.validation_split, _validation_seed(cfg))
    plan = DataPlan(layout, records, [], findings, problems, held_out)
    plan.entries = epoch_entries(records, len(layout.datasets))
    return plan


def _validation_seed(cfg: Config) -> int:
    t = cfg.train
    return t.validation_seed if t.validation_seed is not None else (t.seed or 0)


def split_validation(records: list[ImageRecord], fraction: float,
                     seed: int) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(training, held out): each training subset's images shuffled with `seed`, the first
    ceil(n * (1 - fraction)) trained and the rest held out, as sd-scripts' split_train_val does;
    regularization images all train."""
    if not fraction:
        return records, []
    import random

    held_out = []
    subsets = {id(r.subset): r.subset for r in records if not r.subset.is_reg}  # by identity, in order
    for subset in subsets.values():
        mine = [r for r in records if r.subset is subset]
        random.Random(seed).shuffle(mine)
        held_out += mine[math.ceil(len(mine) * (1 - fraction)):]
    out = {id(r) for r in held_out}
    return [r for r in records if id(r) not in out], held_out


def _problem_list(problems: list[Finding]) -> str:
    return (f"{len(problems)} problem(s) in the training data (dataset.bad_data = \"stop\"; \"skip\" trains without "
            f"these files):\n" + "\n".join(f"  {p}" for p in problems))


def _nothing_found(layout: DataLayout, problems: list[Finding]) -> str:
    folders = [s.image_dir for d in layout.datasets for s in d.subsets if not s.is_reg]
    lines = [f"no training images found (looked in: {', '.join(map(str, folders)) or 'no folder'})"]
    lines += [f"  {n}" for n in layout.notes] + [f"  skipped {p}" for p in problems]
    return "\n".join(lines)


def _scan(layout: DataLayout, decode: bool) -> tuple[list[ImageRecord], list[Finding]]:
    """Every image of every subset: header, caption, bucket, and the findings about it."""
    work = []  # (dataset index, subset, path)
    findings = []
    for d, dataset in enumerate(layout.datasets):
        for subset in dataset.subsets:
            paths = [image for image, _ in subset.metadata] if subset.metadata else list_images(subset.image_dir)
            missing = [p for p in paths if not p.is_file()]
            findings += [Finding(p, "named in the metadata file, no such image") for p in missing]
            paths = [p for p in paths if p not in missing]
            if not paths:
                findings.append(empty_folder(subset.image_dir))
            work += [(d, subset, p) for p in paths]
    bar = CountingBar(len(work), "checking images")
    inspected = inspect_all([p for _, _, p in work], decode, bar.advance)
    bar.close()
    records = []
    sizes = [bucket_sizes(d.buckets) for d in layout.datasets]
    subsets = {id(s): s for _, s, _ in work}.values()
    metadata = {(id(s), p): c for s in subsets if s.metadata for p, c in s.metadata}
    for (d, subset, path), (header, image_findings) in zip(work, inspected):
        findings += image_findings
        if header is not None:
            record, more = _record(path, header, d, subset, layout, sizes[d], metadata.get((id(subset), path)))
            findings += more
            records.append(record)
    duplicates = find_duplicates([r.path for r in records])
    findings += [Finding(p, f"duplicate of {first}") for p, first in duplicates.items()]
    return records, findings


def _record(path: Path, header: ImageHeader, d: int, subset: SubsetSpec, layout: DataLayout,
            sizes: list, metadata_caption: str | None = None) -> tuple[ImageRecord, list[Finding]]:
    findings = []
    if metadata_caption is not None:
        caption, problem = metadata_caption, None  # sd-scripts: an empty caption is allowed there
    else:
        caption, problem = read_caption(path, subset.caption_extension, subset.class_tokens)
    if problem:
        findings.append(Finding(path, problem))
    if subset.control_dir is not None and find_control(subset.control_dir, path) is None:
        findings.append(Finding(path, missing_control(subset.control_dir, path)))
    size = (header.width, header.height)
    if subset.mask_dir is not None and mask_problem(subset.mask_dir, path, size):
        findings.append(Finding(path, mask_problem(subset.mask_dir, path, size)))
    bucket = choose_bucket(size, layout.datasets[d].buckets, sizes)
    if min(bucket) < 8 or min(size) < 8:
        findings.append(Finding(path, f"too small: {size[0]}x{size[1]} fits no bucket"))
    elif upscale_factor(size, bucket) > MAX_UPSCALE:
        findings.append(Finding(path, f"too small: {size[0]}x{size[1]} would be enlarged "
                                      f"{upscale_factor(size, bucket):.1f}x to {bucket[0]}x{bucket[1]} "
                                      f"(more than {MAX_UPSCALE:g}x)"))
    record = ImageRecord(path, caption or "", size, header.orientation, header.has_alpha, d, subset, bucket,
                         conversion(header))
    return record, findings


def epoch_entries(records: list[ImageRecord], num_datasets: int) -> list[int]:
    """Image indices of one epoch: each training image `num_repeats` times, in order, then per dataset the
    regularization images, balanced to as many entries as that dataset's training entries."""
    entries = [i for i, r in enumerate(records) if not r.subset.is_reg for _ in range(r.subset.num_repeats)]
    for d in range(num_datasets):
        wanted = sum(r.subset.num_repeats for r in records if r.dataset == d and not r.subset.is_reg)
        entries += _balanced_reg(records, d, wanted)
    return entries


def _balanced_reg(records: list[ImageRecord], d: int, wanted: int) -> list[int]:
    reg = [i for i, r in enumerate(records) if r.dataset == d and r.subset.is_reg]
    out = []
    for i in reg:  # first pass: each with its repeats
        out += [i] * records[i].subset.num_repeats
    while reg and len(out) < wanted:  # then one more each, in order, until balanced
        out += reg[: wanted - len(out)]
    position = {i: k for k, i in enumerate(reg)}
    return sorted(out[:wanted], key=position.__getitem__)


def plan_training(cfg: Config, say) -> tuple[DataPlan, int]:
    """The run's data plan and its step count, printed, and checked against the rest of the run: a warmup as
    long as the run (known once epochs are counted), and a resumed run's data against what its state trained
    on (refused if it changed, unless save.resume_with_changed_data: then the run continues at the saved step
    with a new epoch). Imports no torch: errors here arrive within a second of starting."""
    from library.engines import launched_processes

    t = cfg.train
    plan = plan_data(cfg, say)  # layout, check (stop or skip), captions, buckets, epoch entries
    processes = launched_processes()  # several processes share each epoch's batches
    steps_per_epoch = plan.steps_per_epoch(t.gradient_accumulation_steps, processes)
    max_steps = t.max_train_epochs * steps_per_epoch if t.max_train_epochs else t.max_train_steps
    for line in plan.summary(t.gradient_accumulation_steps, processes):
        say(line)
    say(f"  {max_steps} steps (~{math.ceil(max_steps / steps_per_epoch)} epochs)")
    if cfg.save.save_n_epoch_ratio:  # sd-scripts: save_every_n_epochs = floor(epochs / ratio), at least 1
        cfg.save.save_every_n_epochs = max(1, math.ceil(max_steps / steps_per_epoch) // cfg.save.save_n_epoch_ratio)
        say(f"  save_n_epoch_ratio {cfg.save.save_n_epoch_ratio}: saving every {cfg.save.save_every_n_epochs} epochs")
    _check_against_run(cfg, plan, max_steps, say)
    return plan, max_steps


def _check_against_run(cfg: Config, plan: DataPlan, max_steps: int, say) -> None:
    from library.config import ConfigError
    from library.config_checks import warmup_too_long
    from library.saved_state import data_changes, data_fingerprint, find_state, read_state_info

    warmup = cfg.optimizer.lr_warmup_steps
    if isinstance(warmup, int) and warmup and warmup >= max_steps:
        raise ConfigError(f"{cfg.source}: {warmup_too_long(warmup, max_steps)}")
    cfg.data_fingerprint = data_fingerprint(plan)
    if not cfg.save.resume:
        return
    folder = find_state(cfg.save.resume, Path(cfg.train.output_dir), say=lambda _: None)
    changes = data_changes(read_state_info(folder).get("data"), cfg.data_fingerprint)
    if changes and not cfg.save.resume_with_changed_data:
        raise ConfigError(f"{cfg.source}: 'save.resume': the data changed since {folder.name} was saved: {changes}. "
                          f"Restore it, or set 'save.resume_with_changed_data' = true to continue at the saved "
                          f"step with a new epoch order")
    if changes:
        say(f"the data changed since {folder.name} ({changes}): continuing at its step with a new epoch")
        cfg.data_fingerprint["changed"] = True
