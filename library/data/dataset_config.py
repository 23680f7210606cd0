"""Which folders are trained with which settings: a sd-scripts dataset TOML, or the folder convention.

A dataset TOML (`dataset.dataset_config`) has [general], [[datasets]] and [[datasets.subsets]]; a key at a
lower level overrides the same key higher up, and a key given nowhere takes its value from the training
config's [dataset] section (whose defaults are the schema's, library/config.py). Dataset keys: resolution,
batch_size and the bucket keys; subset keys: image_dir, num_repeats, class_tokens, is_reg, the caption keys
and the augmentation keys. Every value is type-checked; a problem raises ConfigError naming file and key.

Without a dataset TOML, train_data_dir (and reg_data_dir, is_reg) is read by the folder convention: images
directly in the folder repeat num_repeats times, and a subfolder 'N_name' repeats N times with 'name' as
its class tokens. A subfolder without the 'N_' prefix is skipped with a note saying so.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from library.config import Config, ConfigError, DatasetSection, _check_value, read_text_file
from library.data.augment import AugmentSettings
from library.data.buckets import BucketSettings
from library.data.captions import CaptionRecipe
from library.data.images import list_images

REPEAT_FOLDER = re.compile(r"^(\d+)_(.*)$")
BUCKET_KEYS = ("enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale")
DATASET_KEYS = ("resolution", "batch_size", *BUCKET_KEYS)
CAPTION_KEYS = tuple(f.name for f in dataclasses.fields(CaptionRecipe))
AUGMENT_KEYS = tuple(f.name for f in dataclasses.fields(AugmentSettings))
SUBSET_KEYS = ("image_dir", "num_repeats", "caption_extension", "class_tokens", "is_reg", "control_directory",
               "metadata_file", "conditioning_data_dir", *CAPTION_KEYS, *AUGMENT_KEYS)
# keys a dataset TOML has that the training config does not (their types; their defaults are "not set")
TOML_ONLY = {"image_dir": str, "class_tokens": Optional[str], "is_reg": bool, "batch_size": int,
             "metadata_file": Optional[str], "conditioning_data_dir": Optional[str]}


@dataclass(frozen=True)
class SubsetSpec:
    image_dir: Path
    num_repeats: int
    caption_extension: str
    class_tokens: str | None
    is_reg: bool
    captions: CaptionRecipe
    augment: AugmentSettings
    where: str  # "datasets[0].subsets[1]" or the folder, for messages
    control_dir: Path | None = None  # edit pairs: the control image of each image, same stem
    # fine-tune metadata (library/data/metadata.py): ((image, caption), ...) instead of image_dir's files and
    # caption files
    metadata: tuple[tuple[Path, str], ...] | None = None
    mask_dir: Path | None = None  # masked_loss: the mask image of each image, same stem (library/data/masks.py)


@dataclass
class DatasetSpec:
    buckets: BucketSettings
    batch_size: int
    subsets: list[SubsetSpec]


@dataclass
class DataLayout:
    datasets: list[DatasetSpec]
    notes: list[str]  # what was skipped and why (folder names), to print
    source: str  # the file the layout came from


def read_layout(cfg: Config) -> DataLayout:
    """The datasets of a training config; ConfigError for any problem in the layout's settings."""
    d = cfg.dataset
    if d.dataset_config:
        layout = layout_from_toml(Path(d.dataset_config), d)
        if d.train_data_dir or d.reg_data_dir:
            layout.notes.append("train_data_dir / reg_data_dir ignored: dataset_config is set")
    else:
        layout = layout_from_folders(d, cfg.source)
    check_layout(layout, cfg)
    return layout


# ---- the folder convention --------------------------------------------------------------------


def layout_from_folders(d: DatasetSection, source: str) -> DataLayout:
    for key in ("train_data_dir", "reg_data_dir"):
        if getattr(d, key) and not Path(getattr(d, key)).is_dir():
            raise ConfigError(f"{source}: 'dataset.{key}': no such folder: {getattr(d, key)}")
    values = {k: getattr(d, k) for k in _schema_keys()}
    notes: list[str] = []
    if d.in_json:  # sd-scripts' fine-tune dataset: train_data_dir's images, captioned by the metadata file
        subset = _subset(Path(d.train_data_dir), d.num_repeats, None, False, values, "dataset.in_json")
        subset = dataclasses.replace(subset, metadata=_metadata(d.in_json, Path(d.train_data_dir), subset, source,
                                                                "dataset.in_json"))
        return DataLayout([DatasetSpec(_bucket_settings(values, source, "dataset"), d.train_batch_size, [subset])],
                          notes + (["reg_data_dir ignored: in_json is set (sd-scripts' fine-tune datasets have "
                                    "no regularization images)"] if d.reg_data_dir else []), source)
    subsets = folder_subsets(Path(d.train_data_dir), d.num_repeats, False, values, notes)
    if d.reg_data_dir:  # masks (conditioning_data_dir) are train_data_dir's
        subsets += folder_subsets(Path(d.reg_data_dir), 1, True, values | {"conditioning_data_dir": None}, notes)
    dataset = DatasetSpec(_bucket_settings(values, source, "dataset"), d.train_batch_size, subsets)
    return DataLayout([dataset], notes, source)


def folder_subsets(root: Path, root_repeats: int, is_reg: bool, values: dict,
                   notes: list[str]) -> list[SubsetSpec]:
    """Subsets of `root`: its own images (if any), then each 'N_name' subfolder (empty ones too: the check
    reports them)."""
    subsets = []
    if list_images(root):
        subsets.append(_subset(root, root_repeats, None, is_reg, values))
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        match = REPEAT_FOLDER.match(sub.name)
        if not match:
            notes.append(f"skipped folder {sub}: its name does not start with 'N_' (N = repeats), e.g. '10_{sub.name}'")
        elif int(match.group(1)) < 1:
            notes.append(f"skipped folder {sub}: repeats must be at least 1")
        else:
            subsets.append(_subset(sub, int(match.group(1)), match.group(2).strip() or None, is_reg, values))
    return subsets


def _subset(folder: Path, repeats: int, class_tokens, is_reg: bool, values: dict, where: str = "") -> SubsetSpec:
    return SubsetSpec(folder, repeats, values["caption_extension"], class_tokens, is_reg,
                      CaptionRecipe(**{k: values[k] for k in CAPTION_KEYS}),
                      AugmentSettings(**{k: values[k] for k in AUGMENT_KEYS}), where or str(folder),
                      Path(values["control_directory"]) if values.get("control_directory") else None,
                      mask_dir=Path(values["conditioning_data_dir"]) if values.get("conditioning_data_dir") else None)


# ---- the dataset TOML -------------------------------------------------------------------------


def layout_from_toml(path: Path, d: DatasetSection) -> DataLayout:
    if not path.is_file():
        raise ConfigError(f"'dataset.dataset_config': no such file: {path}")
    raw = _read_toml(path)
    source = str(path)
    _check_keys(raw, {"general", "datasets"}, source, "top level")
    general = _without_sd_scripts_keys(raw.get("general", {}), source, "[general]")
    _check_keys(general, set(DATASET_KEYS) | set(SUBSET_KEYS) - {"image_dir"}, source, "[general]")
    base = {k: getattr(d, k) for k in _schema_keys()} | {"batch_size": d.train_batch_size}
    datasets = []
    if not isinstance(raw.get("datasets", []), list):
        raise ConfigError(f"{source}: write datasets as [[datasets]] (an array of tables)")
    for i, dataset in enumerate(raw.get("datasets", [])):
        where = f"datasets[{i}]"
        dataset = _without_sd_scripts_keys(dataset, source, where)
        _check_keys(dataset, set(DATASET_KEYS) | set(SUBSET_KEYS) | {"subsets"}, source, where)
        values = _typed(base | general | {k: v for k, v in dataset.items() if k != "subsets"}, source, where)
        subsets = [_toml_subset(values, s, source, f"{where}.subsets[{j}]")
                   for j, s in enumerate(dataset.get("subsets", []))]
        if not subsets:
            raise ConfigError(f"{source}: '{where}' has no [[datasets.subsets]]")
        datasets.append(DatasetSpec(_bucket_settings(values, source, where), values["batch_size"], subsets))
    if not datasets:
        raise ConfigError(f"{source}: no [[datasets]] table")
    return DataLayout(datasets, [], source)


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(read_text_file(path))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def _toml_subset(dataset_values: dict, raw: dict, source: str, where: str) -> SubsetSpec:
    raw = _without_sd_scripts_keys(raw, source, where)
    _check_keys(raw, set(SUBSET_KEYS), source, where)
    values = _typed(dataset_values | raw, source, where)
    metadata_file = values.get("metadata_file")
    if "image_dir" not in raw and not metadata_file:
        raise ConfigError(f"{source}: '{where}.image_dir' is required")
    folder = Path(values["image_dir"]) if "image_dir" in raw else None
    if folder is not None and not folder.is_dir():
        raise ConfigError(f"{source}: '{where}.image_dir': no such folder: {folder}")
    subset = _subset(folder or Path(metadata_file).parent, values["num_repeats"], values.get("class_tokens"),
                     values.get("is_reg", False), values, where)
    if not metadata_file:
        return subset
    return dataclasses.replace(subset, metadata=_metadata(metadata_file, folder, subset, source,
                                                          f"{where}.metadata_file"))


def _metadata(path: str, image_dir: Path | None, subset: SubsetSpec, source: str, key: str):
    from library.data.metadata import MetadataError, read_metadata

    try:
        return read_metadata(Path(path), image_dir, subset.captions.caption_separator)
    except MetadataError as e:
        raise ConfigError(f"{source}: '{key}': {e}") from None


def _without_sd_scripts_keys(table, source: str, where: str):
    """sd-scripts' dataset keys this reader does not take (library/sd_vocab.py DATASET_KEYS): dropped at a value
    with no effect, refused otherwise; caption_extention is sd-scripts' old spelling of caption_extension."""
    from library.sd_vocab import DATASET_KEYS

    if not isinstance(table, dict):
        return table
    out = {("caption_extension" if k == "caption_extention" and "caption_extension" not in table else k): v
           for k, v in table.items() if k not in DATASET_KEYS}
    refused = [f"'{k}' = {v!r} is refused: {DATASET_KEYS[k][1]}" for k, v in table.items()
               if k in DATASET_KEYS and not any(v == h and type(v) is type(h) for h in DATASET_KEYS[k][0])]
    if refused:
        raise ConfigError(f"{source}: {where}:\n  " + "\n  ".join(refused))
    return out


def _check_keys(table, allowed: set, source: str, where: str) -> None:
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: '{where}' must be a table")
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.6)
            raise ConfigError(f"{source}: {where}: key '{key}' is not supported here"
                              + (f" (did you mean '{close[0]}'?)" if close else ""))


def _typed(values: dict, source: str, where: str) -> dict:
    """Every value checked against the schema type of its key (or TOML_ONLY); resolution "512,768" read too."""
    hints = typing.get_type_hints(DatasetSection)
    fields = {f.name: f for f in dataclasses.fields(DatasetSection)}
    out = {}
    for key, value in values.items():
        if key == "resolution" and isinstance(value, str) and re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)?", value):
            value = [int(v) for v in value.split(",")]
            value = value[0] if len(value) == 1 else value
        hint, meta = (TOML_ONLY[key], {}) if key in TOML_ONLY else (hints[key], fields[key].metadata)
        out[key] = _check_value(f"{where}.{key}", value, hint, meta, source)
    return out


def _schema_keys() -> list[str]:
    wanted = {"resolution", "num_repeats", "caption_extension", "control_directory", "conditioning_data_dir",
              *BUCKET_KEYS, *CAPTION_KEYS, *AUGMENT_KEYS}
    return [f.name for f in dataclasses.fields(DatasetSection) if f.name in wanted]


def _bucket_settings(values: dict, source: str, where: str) -> BucketSettings:
    res = values["resolution"]
    sizes = [res, res] if isinstance(res, int) else list(res)
    if len(sizes) != 2 or any(s < 8 or s % 8 for s in sizes):
        raise ConfigError(f"{source}: '{where}.resolution' = {res!r}: one or two sizes, each a multiple of 8")
    return BucketSettings((sizes[0], sizes[1]), *(values[k] for k in BUCKET_KEYS))


def used_values(layout: DataLayout) -> tuple[dict, list[str]]:
    """What the run uses, as [dataset] keys: each dataset's resolution, batch size and bucket keys, and each
    subset key all subsets share. With datasets or subsets that differ, the first one's value is given and a
    line per key says how they differ (for the resolved config's comments)."""
    per_dataset = [{"resolution": list(d.buckets.resolution), "train_batch_size": d.batch_size,
                    **{k: getattr(d.buckets, k) for k in BUCKET_KEYS}} for d in layout.datasets]
    per_subset = [{"num_repeats": s.num_repeats, "caption_extension": s.caption_extension,
                   **dataclasses.asdict(s.captions), **dataclasses.asdict(s.augment)}
                  for d in layout.datasets for s in d.subsets]
    values, differ = {}, []
    for rows, what in ((per_dataset, "datasets"), (per_subset, "subsets")):
        for key in rows[0]:
            seen = [row[key] for row in rows]
            values[key] = seen[0]
            if any(v != seen[0] for v in seen):
                differ.append(f"{key} differs between {what}: {seen}")
    res = values["resolution"]
    values["resolution"] = res[0] if res[0] == res[1] else res
    return {k: v for k, v in values.items() if v is not None}, differ


# ---- settings that cannot work together ---------------------------------------------------------


def check_layout(layout: DataLayout, cfg: Config) -> None:
    problems = []
    for i, dataset in enumerate(layout.datasets):
        problems += _bucket_problems(dataset.buckets, f"datasets[{i}]" if cfg.dataset.dataset_config else "dataset")
        if dataset.batch_size < 1:
            problems.append(f"'batch_size' of datasets[{i}] must be at least 1")
        for subset in dataset.subsets:
            problems += _subset_problems(subset, cfg)
    if cfg.dataset.vae_batch_size < 1:
        problems.append("'dataset.vae_batch_size' must be at least 1")
    if problems:
        raise ConfigError(f"{layout.source}:\n  " + "\n  ".join(dict.fromkeys(problems)))


def _bucket_problems(b: BucketSettings, where: str) -> list[str]:
    if not b.enable_bucket:
        return []
    step, problems = b.bucket_reso_steps, []
    if step < 8 or step % 8:
        problems.append(f"'{where}.bucket_reso_steps' = {step}: must be a multiple of 8")
    elif b.min_bucket_reso % step or b.max_bucket_reso % step:
        problems.append(f"'{where}.min_bucket_reso' / 'max_bucket_reso' ({b.min_bucket_reso}, {b.max_bucket_reso})"
                        f" must be multiples of bucket_reso_steps ({step})")
    if not b.min_bucket_reso <= min(b.resolution) <= max(b.resolution) <= b.max_bucket_reso:
        problems.append(f"'{where}': need min_bucket_reso ({b.min_bucket_reso}) <= resolution {b.resolution} "
                        f"<= max_bucket_reso ({b.max_bucket_reso})")
    return problems


def _subset_problems(s: SubsetSpec, cfg: Config) -> list[str]:
    c, where, problems = s.captions, s.where, []
    if s.num_repeats < 1:
        problems.append(f"'{where}.num_repeats' must be at least 1")
    for key in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        if not 0 <= getattr(c, key) <= 1:
            problems.append(f"'{where}.{key}' must be between 0 and 1")
    if c.keep_tokens < 0 or c.caption_dropout_every_n_epochs < 0:
        problems.append(f"'{where}.keep_tokens' and 'caption_dropout_every_n_epochs' cannot be negative")
    if not c.caption_separator:
        problems.append(f"'{where}.caption_separator' cannot be empty")
    if s.mask_dir is not None and not cfg.dataset.masked_loss:
        problems.append(f"'conditioning_data_dir' (in {where}) holds masks for masked_loss: set 'dataset.masked_loss' "
                        f"= true (sd-scripts stops on it without masked_loss too)")
    if s.mask_dir is not None and not s.mask_dir.is_dir():
        problems.append(f"'{where}.conditioning_data_dir': no such folder: {s.mask_dir}")
    if cfg.dataset.cache_latents or cfg.dataset.cache_latents_to_disk:
        for key in ("color_aug", "random_crop"):
            if getattr(s.augment, key):
                problems.append(f"'{key}' (in {where}) changes the pixels every epoch, so latents cannot be "
                                f"cached: turn off '{key}' or 'dataset.cache_latents'")
    if (cfg.train.cache_text_encoder_outputs or cfg.train.cache_text_encoder_outputs_to_disk) and not c.is_fixed:
        problems.append(f"caption shuffling / dropout (in {where}) changes captions every epoch, so text-encoder "
                        f"outputs cannot be cached: turn those off or 'train.cache_text_encoder_outputs'")
    return problems
