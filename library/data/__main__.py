"""The data commands, run alone before training:

    python -m library.data check --config my.toml      # the dataset check (also: python -m library.data.check)
    python -m library.data cache --config my.toml      # build the disk caches (also: python -m library.data.cache)

They live here, above the modules they use: the check reads the data plan (which uses check.py's inspections),
and caching sets the model up as a run does (library/run.py, which uses cache.py's caches).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from library import cli


def check_command(argv: list[str] | None = None) -> int:
    """Every image and caption of a training config (or of a dataset TOML) checked; exit 2 / 3 on problems."""
    from library.data.check import __doc__ as check_doc
    from library.data.plan import plan_data

    parser = argparse.ArgumentParser(description=check_doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "--config_file", dest="config", required=True,
                        help="training TOML, or a sd-scripts dataset TOML")
    parser.add_argument("--dataset_config", help="sd-scripts dataset TOML (with a training --config)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--headers-only", action="store_true", help="read headers and file ends, do not decode")
    args = parser.parse_args(argv)
    with cli.exit_on_user_error():
        cfg = _config_for_check(args)
        plan = plan_data(cfg, say=print)
    for line in plan.summary(cfg.train.gradient_accumulation_steps):
        print(line)
    return 0


def _config_for_check(args):
    """The config to check: a training config (model paths not needed), or a bare dataset TOML."""
    import tomllib

    from library.config_files import config_from_dict, load_config

    overrides = list(args.overrides)
    if args.headers_only:
        overrides.append("dataset.check_decode=false")
    if args.dataset_config:
        overrides.append(f"dataset.dataset_config='{args.dataset_config}'")
    raw = tomllib.loads(Path(args.config).read_text(encoding="utf-8")) if Path(args.config).is_file() else {}
    if "datasets" in raw:  # a sd-scripts dataset TOML on its own
        placeholder = {"model": {"pretrained_model_name_or_path": "-"}, "train": {"output_dir": "-"},
                       "dataset": {"dataset_config": args.config}}
        return config_from_dict(placeholder, source=args.config, overrides=overrides, check_paths=False)
    return load_config(args.config, overrides, check_paths=False)


def cache_command(argv: list[str] | None = None) -> int:
    """The disk caches of a training config, built with the model set up as the recipes set it up."""
    import torch

    from library.data.cache import __doc__ as cache_doc
    from library.data.plan import plan_data
    from library.data.training_set import TrainingSet
    from library.model_files import load_model
    from library.run import Switches, cache_outputs, cast_frozen, dataset_caches, quantize_frozen

    cli.quiet_libraries()
    cfg = cli.load_or_exit(cli.parse_args(argv, cache_doc), recipe="network")
    t = cfg.train
    cfg.dataset.cache_latents_to_disk = True
    t.cache_text_encoder_outputs_to_disk = t.cache_text_encoder_outputs or t.cache_text_encoder_outputs_to_disk
    with cli.exit_on_user_error():
        dataset = TrainingSet(plan_data(cfg), t.seed or 0, cfg.dataset.prior_loss_weight)
        family, parts = load_model(cfg)  # as the recipes load and cast it: the caches then match theirs
        switches = Switches.from_config(cfg)
        quantize_frozen(parts, switches)  # freezes every part; base_model_precision as a run stores it
        cast_frozen(parts, switches)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        cache_outputs(family, parts, dataset_caches(cfg, family, parts, dataset, print), True, device, print)
    return 0


COMMANDS = {"check": check_command, "cache": cache_command}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m library.data {{{'|'.join(COMMANDS)}}} --config my.toml ...", file=sys.stderr)
        return cli.EXIT_CONFIG_ERROR
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
