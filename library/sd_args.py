"""The recipes' command line: ours (--config, --set, --plan, --vram_budget) and every sd-scripts flag.

`train_network.py --pretrained_model_name_or_path=m.safetensors --network_dim 16 --enable_bucket
--network_args "conv_dim=4" "conv_alpha=1"` reads as sd-scripts reads it: `--key value` and `--key=value`,
store-true flags, lists of values after the flag. Flags go on top of `--config_file` (the command line wins,
as in sd-scripts) or stand alone. Each schema key is a flag too, and `--help` lists them all with the
schema's help, then sd-scripts' other options with what this trainer does with them (library/sd_vocab.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import tomllib
import typing
from typing import Union

from library.config import SECTIONS, ConfigError, did_you_mean
from library.sd_vocab import CLI_KINDS, FLAG, FLOAT, FLOATS, INT, LIST, NUM, STR, VOCAB

OWN = ("config", "overrides", "plan", "vram_budget")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ConfigError(f"command line: {message}")


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = _Parser(description=description, allow_abbrev=False,
                     usage="%(prog)s [--config_file FILE] [--sd-scripts-flag VALUE ...] [--set KEY=VALUE ...]",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    own = parser.add_argument_group("this trainer")
    own.add_argument("--config", "--config_file", dest="config",
                     help="training TOML (ours, or a flat sd-scripts one); flags below go on top of it")
    own.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override one config key (repeatable), e.g. --set train.max_train_steps=200")
    own.add_argument("--plan", action="store_true",
                     help="print the planned peak device memory of this config (no GPU, no weights needed)")
    own.add_argument("--vram_budget", type=float, metavar="GB",
                     help="find the memory switches that make this config fit in GB of device memory")
    for name, cls in SECTIONS.items():
        group = parser.add_argument_group(f"[{name}]")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            help_text = f.metadata["help"] + (f" (one of: {', '.join(map(str, f.metadata['choices']))})"
                                              if f.metadata["choices"] else "")
            default_true = f.default is True
            _add(group, f.name, CLI_KINDS.get(f.name) or _kind(hints[f.name]), help_text, default_true)
    for status, title in (("mapped", "sd-scripts options implemented under another name"),
                          ("noop", "sd-scripts options accepted with no effect here"),
                          ("refused", "sd-scripts options refused unless at their default"),
                          ("gui", "kohya_ss GUI keys (read by no sd-scripts script)")):
        group = parser.add_argument_group(title)
        for key, entry in VOCAB.items():
            if entry.status == status:
                _add(group, key, entry.arg, entry.note)
    return parser


def parse(argv: list[str] | None, description: str) -> argparse.Namespace:
    """Our options as attributes, and `flags`: every other option given, {key: value}, in sd-scripts' terms."""
    parser = build_parser(description)
    args, extra = parser.parse_known_args(argv)
    if extra:
        unknown = [a.split("=", 1)[0] for a in extra if a.startswith("--")] or extra
        raise ConfigError("command line: unknown option(s) " + ", ".join(
            f"{u}{did_you_mean(u[2:]) if u.startswith('--') else ''}" for u in unknown))
    flags = {k: v for k, v in vars(args).items() if k not in OWN}
    for k in flags:
        delattr(args, k)
    args.flags = {k: _value(k, v) for k, v in flags.items()}
    for name in OWN:
        if not hasattr(args, name):
            setattr(args, name, None)
    return args


def _add(group, key: str, kind: str, help_text: str, default_true: bool = False) -> None:
    options = {"dest": key, "default": argparse.SUPPRESS, "help": _escape(help_text)}
    if kind == FLAG:
        options["action"] = argparse.BooleanOptionalAction if default_true else "store_true"
    elif kind in (LIST, FLOATS):
        options.update(nargs="*", type=float if kind == FLOATS else str, metavar="VALUE")
    else:
        options.update(type={INT: int, FLOAT: float, NUM: _int_or_float, STR: str}[kind], metavar=kind.upper())
    group.add_argument(f"--{key}", **options)


def _kind(hint) -> str:
    """How a schema type is given on the command line."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) is Union else [hint]
    if len(args) == 1:
        (one,) = args
        if typing.get_origin(one) is list:
            return FLOATS if typing.get_args(one)[0] in (int, float) else LIST
        return {bool: FLAG, int: INT, float: FLOAT, str: STR}[one]
    if set(args) == {int, float}:
        return NUM
    return STR  # a union with a list or a string: read the text as a TOML value (see _value)


def _int_or_float(text: str):
    """sd-scripts' int_or_float: "10" steps, "0.1" or "10%" a fraction."""
    if text.endswith("%"):
        return float(text[:-1]) / 100
    try:
        return int(text)
    except ValueError:
        return float(text)


def _value(key: str, value):
    """Lists of ints stay ints (`--block_dims 4 8`); a STR flag of a key that is not plainly a string is read
    as a TOML value when it is one (`--down_lr_weight "[1,0.5]"`)."""
    if isinstance(value, list) and _list_item(_schema_hint(key)) is int:
        return [int(v) for v in value]
    if isinstance(value, str) and key not in VOCAB and _kind(_schema_hint(key)) == STR \
            and _schema_hint(key) not in (str, typing.Optional[str]):
        try:
            return tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            return value
    return value


def _list_item(hint):
    """The item type of a schema list type (Optional[list[int]] -> int), else None."""
    for one in typing.get_args(hint) if typing.get_origin(hint) is Union else [hint]:
        if typing.get_origin(one) is list:
            return typing.get_args(one)[0]
    return None


def _schema_hint(key: str):
    for cls in SECTIONS.values():
        hints = typing.get_type_hints(cls)
        if key in hints:
            return hints[key]
    return None


def _escape(text: str) -> str:
    return text.replace("%", "%%")
