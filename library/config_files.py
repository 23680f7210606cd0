"""Reading a config: a TOML file (ours, or sd-scripts' flat one), sd-scripts command-line flags on top,
`--set` overrides, then every check that runs before a model loads (library/config_checks.py); and
write_resolved, the config as a run used it. The schema itself is library/config.py, which imports none of
these: the checks, sd-scripts' mapping and the dataset TOML all read the schema, and this module reads them.
"""
from __future__ import annotations

import os
import tomllib
from pathlib import Path

import toml

from library.config import SECTIONS, Config, ConfigError, _apply_override, _build_section, read_text_file
from library.config_checks import check_combinations, check_paths as check_files
from library.sd_flat import default_notes, map_flat


def load_config(path: str | os.PathLike | None, overrides: list[str] = (), check_paths: bool = True,
                flags: dict | None = None) -> Config:
    """Read a TOML file (ours or sd-scripts' flat one), put sd-scripts command-line `flags` on top (they win,
    as in sd-scripts), apply `--set` overrides, validate. Without a file the flags are the whole config."""
    raw, source = {}, "command line"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = tomllib.loads(read_text_file(path))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        source = str(path) + (" + command line" if flags else "")
    return config_from_dict(raw, source=source, overrides=overrides, check_paths=check_paths, flags=flags)


def config_from_dict(raw: dict, source: str = "<dict>", overrides: list[str] = (),
                     check_paths: bool = True, flags: dict | None = None) -> Config:
    sections, notes, given = _sections_of(raw, source, flags or {})
    for item in overrides:
        _apply_override(sections, item, source)
    cfg = Config(**{name: _build_section(name, sections.get(name, {}), source) for name in SECTIONS},
                 source=source, notes=notes, sd_scripts_keys=given)
    if check_paths:
        check_files(cfg)
    check_combinations(cfg)
    return cfg


def _sections_of(raw: dict, source: str, flags: dict) -> tuple[dict[str, dict], list[str], frozenset | None]:
    """Our sectioned layout, or a flat sd-scripts file mapped onto it; command-line flags on top. Also the
    flat keys of sd-scripts input (Config.sd_scripts_keys; with a sectioned file, its command-line flags)."""
    tables = {k for k, v in raw.items() if isinstance(v, dict)}
    if raw and tables == set(raw) and tables <= set(SECTIONS):
        sections = {k: dict(v) for k, v in raw.items()}
        if not flags:
            return sections, [], None
        mapped = map_flat(flags, source)
        for name, values in mapped.sections.items():
            sections.setdefault(name, {}).update(values)
        return sections, mapped.notes, _set_keys(flags)
    flat: dict[str, Any] = {}
    for k, v in raw.items():
        if isinstance(v, dict):
            flat.update(v)  # sd-scripts ignores section names
        else:
            flat[k] = v
    flat.update(flags)  # the command line wins, as in sd-scripts
    mapped = map_flat(flat, source)
    return mapped.sections, mapped.notes + default_notes(flat), _set_keys(flat)


def _set_keys(flat: dict) -> frozenset:
    return frozenset(k for k, v in flat.items() if v not in (False, None, "", [], 0))


def write_resolved(cfg: Config, path: Path) -> None:
    """The config as it was run (defaults filled in, seed drawn), in our sectioned layout. With a dataset TOML,
    [dataset] records what its datasets use (resolution, batch size, buckets, shared subset keys)."""
    values = cfg.to_toml_dict()
    comments = [f"# resolved from {cfg.source}", f"# run_id = {cfg.run_id}"]
    if cfg.dataset.dataset_config:
        from library.data.dataset_config import layout_from_toml, used_values  # it reads this schema

        used, differ = used_values(layout_from_toml(Path(cfg.dataset.dataset_config), cfg.dataset))
        values["dataset"].update(used)
        comments += [f"# [dataset] from {cfg.dataset.dataset_config}" + (": the first dataset / subset where they "
                                                                        "differ" if differ else "")]
        comments += [f"#   {line}" for line in differ]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("\n".join(comments) + "\n" + toml.dumps(values), encoding="utf-8")
    os.replace(tmp, path)
