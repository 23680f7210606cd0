"""The command line shared by the recipes: --config (alias --config_file) and --set overrides.

Configuration problems print one clear message and exit with code 2, before any model is loaded."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings

from library.config import Config, ConfigError
from library.config_files import load_config
from library.config_checks import check_recipe

EXIT_CONFIG_ERROR = 2
EXIT_DATASET_ERROR = 3


def parse_args(argv: list[str] | None, description: str) -> argparse.Namespace:
    """Our options and every sd-scripts flag (library/sd_args.py); bad flags exit 2 with one line."""
    from library.sd_args import parse

    try:
        return parse(argv, description)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG_ERROR) from None


def load_or_exit(args: argparse.Namespace, recipe: str) -> Config:
    """The validated config, or exit 2 with one message; `recipe` is "network" or "db"."""
    try:
        dataset_config = getattr(args, "dataset_config", None)
        overrides = [*args.overrides,
                     *([f"dataset.dataset_config={json.dumps(dataset_config)}"] if dataset_config else [])]
        planning = bool(getattr(args, "plan", False) or getattr(args, "vram_budget", None))
        cfg = load_config(args.config, overrides, check_paths=not planning,  # a plan needs no files
                          flags=getattr(args, "flags", None))
        check_recipe(cfg, recipe)
        for note in cfg.notes:
            print(f"note: {note}", file=sys.stderr)
        return cfg
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG_ERROR) from None


@contextlib.contextmanager
def exit_on_user_error():
    """Problems found after loading the config (the dataset TOML, the dataset check, a resume state, a save
    that cannot be written, a diverged loss, a GPU out of memory) print one message and exit: 2 for a
    configuration error or settings that do not fit the GPU, 3 for problems in the data or a loss that stays
    NaN/inf."""
    from library.data import DatasetError

    try:
        yield
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG_ERROR) from None
    except DatasetError as e:
        print(f"dataset error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_DATASET_ERROR) from None
    except RuntimeError as e:
        from library.guards import NonFiniteLoss  # here: guards imports torch, which a config error never needs

        if isinstance(e, NonFiniteLoss):
            print(f"training stopped: {e}", file=sys.stderr)  # the loss diverged: the settings or data, not a bug
            raise SystemExit(EXIT_DATASET_ERROR) from None
        if isinstance(e, sys.modules["torch"].OutOfMemoryError):
            print(out_of_memory_line(e), file=sys.stderr)  # the settings do not fit this GPU: a config matter
            raise SystemExit(EXIT_CONFIG_ERROR) from None
        raise


def out_of_memory_line(error: BaseException) -> str:
    """One line for a GPU out-of-memory error: in which phase, what torch said, and what to try."""
    from library.phases import OOM_HINT, failed_in

    said = str(error).strip().splitlines()[0] if str(error).strip() else "CUDA out of memory"
    return f"out of GPU memory while {failed_in(error)}: {said[:200]}. {OOM_HINT}"


def recipe_main(argv: list[str] | None, description: str, recipe: str, train) -> int:
    """A recipe's main(): the command line, the config (exit 2 on a problem), then either the memory planner
    (--plan / --vram_budget) or the files' headers and the data plan checked before torch loads and
    train(cfg, planned); a user's mistake anywhere is one line and exit 2 (config) or 3 (data)."""
    quiet_libraries()
    args = parse_args(argv, description)
    cfg = load_or_exit(args, recipe=recipe)
    with exit_on_user_error():
        if args.plan or args.vram_budget:  # the memory planner instead of training
            from library import planner

            return planner.run(cfg, recipe, args.vram_budget)
        from library.model_files import check_files

        check_files(cfg)  # the model and adapter files can be read (headers only): the first second of the run
        train(cfg, plan_data(cfg))  # every image and caption checked, before torch loads
    return 0


def plan_data(cfg: Config):
    """The run's data plan (library/data/plan.py plan_training), made before torch loads, so a bad image or
    caption is reported within a second or two; only the main process prints it (RANK is set by accelerate
    launch)."""
    from library.data.plan import plan_training

    quiet = os.environ.get("RANK", "0") != "0"
    return plan_training(cfg, (lambda _: None) if quiet else print)


def quiet_libraries() -> None:
    """Keep the log readable: library chatter that says nothing about this run is silenced."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import logging

    for name in ("diffusers", "transformers", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
