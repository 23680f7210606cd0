"""The command line shared by the recipes: --config (alias --config_file) and --set overrides.

Configuration problems print one clear message and exit with code 2, before any model is loaded."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings

from library.config import Config, ConfigError, load_config
from library.config_checks import check_recipe

EXIT_CONFIG_ERROR = 2
EXIT_DATASET_ERROR = 3


def parse_args(argv: list[str] | None, description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", "--config_file", dest="config", required=True,
                        help="training TOML (ours, or a flat sd-scripts one)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config key (repeatable), e.g. --set train.max_train_steps=200")
    parser.add_argument("--dataset_config", help="sd-scripts dataset TOML (same as dataset.dataset_config)")
    parser.add_argument("--plan", action="store_true",
                        help="print the planned peak device memory of this config (no GPU, no weights needed)")
    parser.add_argument("--vram_budget", type=float, metavar="GB",
                        help="find the memory switches that make this config fit in GB of device memory")
    return parser.parse_args(argv)


def load_or_exit(args: argparse.Namespace, recipe: str) -> Config:
    """The validated config, or exit 2 with one message; `recipe` is "network" or "db"."""
    try:
        dataset_config = getattr(args, "dataset_config", None)
        overrides = [*args.overrides,
                     *([f"dataset.dataset_config={json.dumps(dataset_config)}"] if dataset_config else [])]
        planning = bool(getattr(args, "plan", False) or getattr(args, "vram_budget", None))
        cfg = load_config(args.config, overrides, check_paths=not planning)  # a plan needs no files
        check_recipe(cfg, recipe)
        return cfg
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG_ERROR) from None


@contextlib.contextmanager
def exit_on_user_error():
    """Problems found after loading the config but before any model loads (the dataset TOML, the dataset
    check) print one message and exit: 2 for a configuration error, 3 for problems in the data."""
    from library.data import DatasetError

    try:
        yield
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG_ERROR) from None
    except DatasetError as e:
        print(f"dataset error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_DATASET_ERROR) from None


def quiet_libraries() -> None:
    """Keep the log readable: library chatter that says nothing about this run is silenced."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import logging

    for name in ("diffusers", "transformers", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
