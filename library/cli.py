"""The command line shared by the recipes: --config (alias --config_file) and --set overrides.

Configuration problems print one clear message and exit with code 2, before any model is loaded."""
from __future__ import annotations

import argparse
import os
import sys
import warnings

from library.config import Config, ConfigError, check_recipe, load_config

EXIT_CONFIG_ERROR = 2


def parse_args(argv: list[str] | None, description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", "--config_file", dest="config", required=True,
                        help="training TOML (ours, or a flat sd-scripts one)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config key (repeatable), e.g. --set train.max_train_steps=200")
    return parser.parse_args(argv)


def load_or_exit(args: argparse.Namespace, recipe: str) -> Config:
    """The validated config, or exit 2 with one message; `recipe` is "network" or "db"."""
    try:
        cfg = load_config(args.config, args.overrides)
        check_recipe(cfg, recipe)
        return cfg
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG_ERROR) from None


def quiet_libraries() -> None:
    """Keep the log readable: library chatter that says nothing about this run is silenced."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import logging

    for name in ("diffusers", "transformers", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
