"""One setup for the recipes and the planner (library/run.py): both recipes and the planner build what trains,
the memory switches and the optimizer with the same functions, read the same settings from a config, and none
of them keeps a copy of those steps (the copies were where they drifted apart)."""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETUP = {"add_adapters", "train_whole", "apply_switches", "make_optimizer"}
# what run.py does inside those; a caller of these directly has its own copy of the setup
INSIDE_SETUP = {"cast_frozen_parts", "cast_trainable", "store_t5", "set_attention", "enable_gradient_checkpointing",
                "store_fp8_base", "offload_checkpoints", "make_swapper", "inject", "FusedBackward", "build_optimizer",
                "Accelerator", "init_trackers", "allow_fp16_gradients", "claim_output_dir", "write_resolved"}


def called_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            f = node.func
            names.add(f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else "")
    return names


@pytest.mark.parametrize("path", ["train_network.py", "train_db.py", "library/planner/step.py"])
def test_recipes_and_planner_call_the_one_setup_and_no_copy_of_it(path):
    called = called_names(ROOT / path)
    assert called & SETUP >= ({"add_adapters", "apply_switches", "make_optimizer"} if path != "train_db.py"
                              else {"train_whole", "apply_switches", "make_optimizer"})
    assert called & INSIDE_SETUP == set()


def test_the_planner_caches_and_places_with_the_runs_functions():
    """The planner builds its caches and places the parts with run.cache_outputs / place_denoiser, as
    cache_and_place (both recipes) does; neither it nor the recipes move the VAE, text encoders or denoiser
    themselves, or build caches with library.data.cache's functions."""
    planner, run = called_names(ROOT / "library/planner/step.py"), _body_calls(ROOT / "library/run.py",
                                                                               "cache_and_place")
    assert {"cache_outputs", "place_denoiser"} <= planner and {"cache_outputs", "place_denoiser"} <= run
    for path in ["train_network.py", "train_db.py"]:
        assert called_names(ROOT / path) & CACHING_INSIDE == set(), path
    for function in ["_run", "_setup", "_place_and_cache", "_train_step"]:  # the planner's caching and step
        assert _body_calls(ROOT / "library/planner/step.py", function) & CACHING_INSIDE == set(), function
    # (its _one_image still places the parts for a sample / class image as library/sampling.py and
    # library/prior.py do, with library.offload's OneAtATime: the diffusers pipelines do not run on fake tensors)
    assert {"cache_and_place"} <= called_names(ROOT / "train_network.py") & called_names(ROOT / "train_db.py")


CACHING_INSIDE = {"cache_latents", "cache_text_outputs", "OneAtATime", "move"}


def _body_calls(path: Path, function: str) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    body = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function)
    return {n.func.id if isinstance(n.func, ast.Name) else getattr(n.func, "attr", "")
            for n in ast.walk(body) if isinstance(n, ast.Call)}


def test_the_setup_check_sees_a_copy():
    """The check above would fail on the recipes as they were (each cast, placed and built its own)."""
    copy = "def train(cfg):\n    cast_frozen_parts(parts, dtype, False)\n    swapper = make_swapper(f, p, 2, 'cuda')\n"
    tree = ast.parse(copy)
    calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert calls & INSIDE_SETUP == {"cast_frozen_parts", "make_swapper"}


def test_the_planner_plans_the_switches_and_optimizer_a_run_uses(make_config):
    """settings_from_config reads the run's own Switches / OptimizerSettings; only what fake tensors cannot run
    differs (xformers planned as SDPA, int8 T5 as 1-byte storage)."""
    from library.planner import settings_from_config
    from library.run import OptimizerSettings, Switches

    cfg = make_config(train={"mixed_precision": "bf16", "full_bf16": True, "gradient_checkpointing": True,
                             "no_half_vae": True, "cpu_offload_checkpointing": True},
                      optimizer={"optimizer_type": "Adafactor", "max_grad_norm": 0.5, "learning_rate": 3e-4,
                                 "optimizer_args": ["relative_step=False", "scale_parameter=False"]})
    planned = settings_from_config(cfg, "network")
    assert planned.switches() == Switches.from_config(cfg)
    assert planned.optimizer_settings() == OptimizerSettings.from_config(cfg)
    assert planned.switches().gradient_checkpointing and planned.switches().full_bf16
    assert planned.optimizer_settings().optimizer_args == ["relative_step=False", "scale_parameter=False"]
    cfg.model.t5xxl_precision = "int8"
    cfg.train.xformers = True
    changed = {f.name for f in dataclasses.fields(Switches)
               if getattr(settings_from_config(cfg, "network").switches(), f.name)
               != getattr(Switches.from_config(cfg), f.name)}
    assert changed == {"t5xxl_precision", "xformers"}
