"""DeepSpeed ZeRO full fine-tunes (train_db.py) on 2 CPU processes over gloo (tests/deepspeed_cpu.py starts
them as `accelerate launch --use_deepspeed` would): the weights file, gathered from ZeRO's fp32 partitions, equals
one process trained on the global batch; the frozen VAE and text encoder are written untouched; a state saved
through accelerate resumes to the uninterrupted run's weights. The config checks are tests/test_engines.py."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from test_multiprocess import ENV, _config

pytest.importorskip("deepspeed", reason="deepspeed is not installed (the test extra installs it)")
pytestmark = pytest.mark.slow

DB = """
    [dreambooth]
    train_text_encoder = false
"""


def _zero_env(stage: int) -> dict:
    """What `accelerate launch --use_deepspeed --zero_stage N --gradient_clipping 0.05 --gradient_accumulation_steps
    2` puts in the environment (no ACCELERATE_USE_CPU: accelerate would not set up DeepSpeed)."""
    env = {k: v for k, v in ENV.items() if k != "ACCELERATE_USE_CPU"}
    return {**env, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(stage),
            "ACCELERATE_GRADIENT_CLIPPING": "0.05", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "2",
            "ACCELERATE_MIXED_PRECISION": "no"}


def _zero_run(config, stage: int, port: int):
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(port), str(ROOT / "tests" / "deepspeed_cpu.py"), "--config", str(config)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env=_zero_env(stage))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return run


def _configure(path):
    """3 steps of 2 accumulated micro-batches, SGD with Nesterov momentum clipped by max_grad_norm 0.05 (unclipped
    the weights move 0.035)."""
    path.write_text(path.read_text().replace("learning_rate = 0.05", "learning_rate = 0.05\nmax_grad_norm = 0.05")
                    .replace("max_train_steps = 4", "max_train_steps = 3\ngradient_accumulation_steps = 2"))
    return path


@pytest.fixture(scope="module")
def alone(tmp_path_factory, tiny_sd1, tiny_data):
    """One process on the global batch (2 images a micro-batch), 3 steps: its weights file."""
    folder = tmp_path_factory.mktemp("alone")
    one = _configure(_config(folder, tiny_sd1, tiny_data, "one", 2, DB))
    single = subprocess.run([sys.executable, "train_db.py", "--config", str(one)], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, env=ENV)
    assert single.returncode == 0, single.stderr[-3000:]
    return load_file(folder / "one" / "last.safetensors")


def _assert_one_process(zero: dict, alone: dict, base: dict) -> float:
    """The ZeRO run's weights file against one process': the same keys, the UNet trained (clipped) to the same
    weights within 1e-5, the VAE and text encoder as loaded. Returns the largest difference."""
    assert set(zero) == set(alone) == set(base)
    unet = [k for k in alone if k.startswith("model.diffusion_model.")]
    moved = max((alone[k] - base[k]).abs().max().item() for k in unet)
    assert 1e-4 < moved < 0.01, moved  # it trained, clipped
    worst = max((zero[k] - alone[k]).abs().max().item() for k in zero)
    print(f"largest difference to one process {worst:.1e}, the UNet moved {moved:.1e}")
    assert worst < 1e-5, worst
    assert all(torch.equal(zero[k], base[k]) for k in zero if k not in unet)  # VAE, text encoder untouched
    return worst


@pytest.mark.parametrize("stage, port", [(1, 29551), (2, 29557)])
def test_zero1_and_zero2_full_fine_tune_equals_one_process_on_the_global_batch(tmp_path, tiny_sd1, tiny_data, alone,
                                                                             stage, port):
    """ZeRO-1 (the optimizer state partitioned; accelerate skips DeepSpeed's all-reduce on the first micro-batch
    with no_sync) and ZeRO-2 (the gradients too), the module whole on each process; DeepSpeed's engine accumulates
    (1 image a micro-batch and process), clips and steps inside accelerator.backward (measured: 6e-8)."""
    two = _configure(_config(tmp_path, tiny_sd1, tiny_data, "two", 1, DB))
    run = _zero_run(two, stage, port)
    assert "full fine-tune" in run.stdout
    _assert_one_process(load_file(tmp_path / "two" / "last.safetensors"), alone, load_file(tiny_sd1[1]))


def test_zero3_trains_as_one_process_and_its_state_resumes_exactly(tmp_path, tiny_sd1, tiny_data, alone):
    """ZeRO-3 (the weights partitioned too): the weights file equals one process on the global batch (measured:
    1.5e-8); the state saved at step 2 holds DeepSpeed's partitions of each process and its RNGs, and resumed on 2
    processes it ends at the very weights and losses of the uninterrupted run (measured: 0.0)."""
    more = """
        [save]
        save_every_n_steps = 2
        save_state = true
    """
    two = _configure(_config(tmp_path, tiny_sd1, tiny_data, "two", 1, DB + more))
    state = tmp_path / "two" / "last-step00000002-state"
    resumed = tmp_path / "resumed.toml"
    resumed.write_text(two.read_text().replace(f'"{tmp_path / "two"}"', f'"{tmp_path / "resumed"}"')
                       .replace("save_state = true", f'resume = "{state}"'))
    first, again = _zero_run(two, 3, 29553), _zero_run(resumed, 3, 29555)
    whole = load_file(tmp_path / "two" / "last.safetensors")
    _assert_one_process(whole, alone, load_file(tiny_sd1[1]))
    info = json.loads((state / "state.json").read_text())
    assert info["sharded"] == "deepspeed" and info["processes"] == 2 and info["step"] == 2
    assert {p.name for p in (state / "sharded" / "pytorch_model").iterdir()} == {
        f"zero_pp_rank_{i}_mp_rank_00_{kind}_states.pt" for i in (0, 1) for kind in ("model", "optim")}
    assert not list((tmp_path / "two").glob("*.tmp")) and not list((tmp_path / "two").glob("*.old"))
    losses = [[line.split()[3] for line in r.stdout.splitlines() if line.startswith("step ")] for r in (first, again)]
    assert len(losses[0]) == 3 and losses[1] == losses[0][2:]
    resumed_weights = load_file(tmp_path / "resumed" / "last.safetensors")
    assert max((whole[k] - resumed_weights[k]).abs().max().item() for k in whole) == 0.0
