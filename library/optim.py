"""Optimizers and learning-rate schedules by the names sd-scripts users type."""
from __future__ import annotations

import torch

from library.config import ConfigError, parse_kv_args


def build_optimizer(name: str, param_groups: list[dict], lr: float, args: list[str]) -> torch.optim.Optimizer:
    """`name` is case-insensitive: AdamW, AdamW8bit (bitsandbytes), Adafactor (transformers).

    Adafactor is used as sd-scripts' users run it for fine-tuning: with the given learning rate and
    our schedule (relative_step, scale_parameter and warmup_init off unless optimizer_args say so)."""
    kwargs = parse_kv_args(args)
    key = name.lower()
    if key == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, **kwargs)
    if key == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(param_groups, lr=lr, **kwargs)
    if key == "adafactor":
        from transformers.optimization import Adafactor

        kwargs = {"scale_parameter": False, "relative_step": False, "warmup_init": False, **kwargs}
        if kwargs["relative_step"]:
            raise ConfigError("Adafactor with relative_step=True picks its own learning rate; this trainer "
                              "drives it with learning_rate and lr_scheduler: use relative_step=False")
        return Adafactor(param_groups, lr=lr, **kwargs)
    raise ConfigError(f"optimizer_type {name!r} is not available")


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, warmup: int | float, total_steps: int,
                    num_cycles: int = 1, power: float = 1.0):
    """diffusers' schedules; `warmup` below 1 is a fraction of the total steps."""
    from diffusers.optimization import get_scheduler

    warmup_steps = int(warmup * total_steps) if isinstance(warmup, float) and warmup < 1 else int(warmup)
    if name == "constant" and warmup_steps:
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
                         num_cycles=num_cycles, power=power)
