"""DeepSpeed states as a resumed run loads them: resharded for another number of processes, and DeepSpeed's CPU
Adam brought to the step it resumes at.

Resharding: each process saved its own ZeRO partition of
the fp32 master weights and the optimizer state (accelerator.save_state: DeepSpeed's checkpoint folder), cut
for that many processes. DeepSpeed reshards them through its universal checkpoint: an offline conversion
(deepspeed.checkpoint.ds_to_universal: every weight's fp32 master and Adam moments whole, one folder a weight)
that an engine told to `load_universal` cuts for its own processes as it loads. Here the main process converts
the state into a temporary folder beside this run's outputs, every process loads from it, and it goes; the
state itself is only read. The conversion carries Adam's moments (exp_avg, exp_avg_sq, step): the state of
any other optimizer would be lost, so saved_state refuses those before loading."""
from __future__ import annotations

import argparse
import contextlib
import io
import shutil
from pathlib import Path

RESHARDABLE = ("adamw", "adam")  # optimizers whose whole state the universal conversion carries
MODEL_FOLDER = "pytorch_model"  # accelerator.save_state's DeepSpeed checkpoint tag (accelerate's MODEL_NAME)


def reshard_problem(optimizer: dict) -> str | None:
    """Why a state of this [optimizer] section cannot be resharded (None if it can): the universal conversion
    writes exp_avg / exp_avg_sq / step only, so AMSGrad's max_exp_avg_sq and other optimizers' state would go."""
    kind = str(optimizer.get("optimizer_type", "AdamW"))
    if kind.lower() not in RESHARDABLE:
        return f"its optimizer is {kind}, and DeepSpeed reshards the state of Adam / AdamW only"
    if any(str(arg).replace(" ", "").lower() == "amsgrad=true" for arg in optimizer.get("optimizer_args") or []):
        return "its optimizer uses amsgrad, whose max_exp_avg_sq DeepSpeed's resharding does not carry"
    return None


def load_deepspeed_state(accelerator, shards: Path, saved_processes: int, scratch: Path) -> None:
    """accelerator.load_state of a DeepSpeed state's `shards` folder: as saved, or resharded in `scratch` when
    another number of processes saved it; then CPU Adam (if it steps) brought to the loaded step."""
    if saved_processes == accelerator.num_processes:
        accelerator.load_state(str(shards))
    else:
        with resharded(accelerator, shards, scratch) as universal:
            accelerator.load_state(str(universal))
    replay_cpu_adam_steps(accelerator)


@contextlib.contextmanager
def resharded(accelerator, shards: Path, scratch: Path, say=print):
    """The folder to give accelerator.load_state for the DeepSpeed state in `shards` (saved by another number
    of processes): while open, the universal checkpoint of it in `scratch` (written by the main process, with
    the state's per-process RNG files beside it), and the engine set to load universal checkpoints. Every
    process enters it; the folder is removed when all have loaded."""
    engine = accelerator.deepspeed_engine_wrapped.engine
    folder = Path(scratch) / f".{shards.parent.name}-universal.tmp"
    if accelerator.is_main_process:
        n = accelerator.num_processes
        say(f"resharding the DeepSpeed state for {n} process{'es' if n > 1 else ''} (DeepSpeed's universal "
            f"checkpoint, in {folder})")
        _convert(shards, folder)
    accelerator.wait_for_everyone()
    was = engine._config.load_universal_checkpoint  # the engine's own switch: no public setter after initialize
    engine._config.load_universal_checkpoint = True
    try:
        yield folder
    finally:
        engine._config.load_universal_checkpoint = was
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(folder, ignore_errors=True)


def _convert(shards: Path, folder: Path) -> None:
    """`folder`: accelerator.save_state's layout, its DeepSpeed tag folder in the universal format, the RNG files
    copied. A folder left by an interrupted conversion is ours (a .tmp name) and is written again. A conversion
    that fails (a disk full, a partition DeepSpeed cannot read) is a ConfigError naming the state; its folder
    goes."""
    from deepspeed.checkpoint import ds_to_universal

    from library.config import ConfigError

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    args = argparse.Namespace(input_folder=str(shards / MODEL_FOLDER), output_folder=str(folder / MODEL_FOLDER),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # accelerate's checkpoints do not record it themselves
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its progress lines
            ds_to_universal.main(args)
    except Exception as e:  # noqa: BLE001 - whatever DeepSpeed's conversion raises, one line for the user
        shutil.rmtree(folder, ignore_errors=True)
        raise ConfigError(f"'save.resume': {shards.parent} could not be resharded for this number of processes "
                          f"(DeepSpeed's universal conversion into {folder}: {type(e).__name__}: {e}); resume it "
                          f"with as many processes as saved it") from None
    for rng in shards.glob("random_states_*.pkl"):
        shutil.copy2(rng, folder / rng.name)


def replay_cpu_adam_steps(accelerator) -> None:
    """After a DeepSpeed state is loaded: DeepSpeed's CPU Adam (`offload_optimizer_device cpu`) keeps beta1^t and
    beta2^t in its C++ op as running products, multiplied once a step, while a new op (a resumed run's) starts
    them from pow(beta, t) at its first step: a rounding apart, which Adam amplifies where gradients are near 0
    (3.4e-6 after two more steps on the tiny SD1). The new op is walked through the loaded steps on empty
    tensors (nothing is updated), so its products are the uninterrupted run's and the resumed run is exact."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    base = getattr(accelerator.deepspeed_engine_wrapped.engine.optimizer, "optimizer", None)
    if isinstance(base, DeepSpeedCPUAdam):
        replay_steps(base)


def replay_steps(cpu_adam) -> None:
    """Walk a DeepSpeedCPUAdam whose state was loaded through the steps that state has taken, on empty tensors."""
    import torch

    steps = [int(state["step"]) for state in cpu_adam.state.values() if "step" in state]
    group, empty = cpu_adam.param_groups[0], torch.empty(0)
    for step in range(1, max(steps, default=0) + 1):
        cpu_adam.ds_opt_adam.adam_update(cpu_adam.opt_id, step, group["lr"], *group["betas"], group["eps"],
                                         group["weight_decay"], group["bias_correction"], empty, empty, empty, empty)
