"""DeepSpeed ZeRO full fine-tunes (train_db.py) on 2 CPU processes over gloo (tests/deepspeed_cpu.py starts
them): the weights file equals one process trained on the global batch, the frozen parts are written untouched,
and a state saved through accelerate resumes to the uninterrupted run's weights."""
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
    """What `accelerate launch --use_deepspeed --zero_stage N --gradient_clipping 0.05` puts in the environment
    (no ACCELERATE_USE_CPU: accelerate would not set up DeepSpeed)."""
    env = {k: v for k, v in ENV.items() if k != "ACCELERATE_USE_CPU"}
    return {**env, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(stage),
            "ACCELERATE_GRADIENT_CLIPPING": "0.05", "ACCELERATE_MIXED_PRECISION": "no"}


def _zero_run(tmp_path, config, stage: int, port: int):
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(port), str(ROOT / "tests" / "deepspeed_cpu.py"), "--config", str(config)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env=_zero_env(stage))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return run


def _configs(tmp_path, tiny_sd1, tiny_data, more=""):
    """The ZeRO run (1 image per process and step) and one process on the global batch (2), clipped (max_grad_norm
    0.05 clips: unclipped the weights move 0.035)."""
    two = _config(tmp_path, tiny_sd1, tiny_data, "two", 1, DB + more)
    one = _config(tmp_path, tiny_sd1, tiny_data, "one", 2, DB + more)
    for path in (two, one):
        path.write_text(path.read_text().replace("learning_rate = 0.05", "learning_rate = 0.05\nmax_grad_norm = 0.05")
                        .replace("max_train_steps = 4", "max_train_steps = 3"))
    return two, one


@pytest.mark.parametrize("stage, port", [(2, 29551), (3, 29553)])
def test_zero_full_fine_tune_equals_one_process_on_the_global_batch(tmp_path, tiny_sd1, tiny_data, stage, port):
    two, one = _configs(tmp_path, tiny_sd1, tiny_data)
    run = _zero_run(tmp_path, two, stage, port)
    single = subprocess.run([sys.executable, "train_db.py", "--config", str(one)], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, env=ENV)
    assert single.returncode == 0, single.stderr[-3000:]
    zero, alone = load_file(tmp_path / "two" / "last.safetensors"), load_file(tmp_path / "one" / "last.safetensors")
    base = load_file(tiny_sd1[1])
    assert set(zero) == set(alone) == set(base)
    unet = [k for k in alone if k.startswith("model.diffusion_model.")]
    moved = max((alone[k] - base[k]).abs().max().item() for k in unet)
    assert 1e-4 < moved < 0.01, moved  # it trained, clipped
    worst = max((zero[k] - alone[k]).abs().max().item() for k in zero)
    print("worst", worst, "moved", moved)
    assert worst < 1e-5, worst
    assert all(torch.equal(zero[k], base[k]) for k in zero if k not in unet)  # VAE, text encoder untouched


def test_zero3_state_is_saved_through_accelerate_and_resumes_exactly(tmp_path, tiny_sd1, tiny_data):
    more = """
        [save]
        save_every_n_steps = 2
        save_state = true
    """
    run, _ = _configs(tmp_path, tiny_sd1, tiny_data, more)
    run.write_text(run.read_text().replace("max_train_steps = 3", "max_train_steps = 4"))
    resumed = tmp_path / "resumed.toml"
    state = tmp_path / "two" / "last-step00000002-state"
    resumed.write_text(run.read_text().replace(f'"{tmp_path / "two"}"', f'"{tmp_path / "resumed"}"')
                       .replace("save_state = true", f'resume = "{state}"'))
    first, again = _zero_run(tmp_path, run, 3, 29555), _zero_run(tmp_path, resumed, 3, 29557)
    print(sorted(str(p.relative_to(state)) for p in state.rglob("*")))
    info = json.loads((state / "state.json").read_text())
    assert info["sharded"] == "deepspeed" and info["processes"] == 2 and info["step"] == 2
    losses = [[line.split()[3] for line in r.stdout.splitlines() if line.startswith("step ")] for r in (first, again)]
    assert len(losses[0]) == 4 and losses[1] == losses[0][2:]
    whole, resumed_weights = (load_file(tmp_path / name / "last.safetensors") for name in ("two", "resumed"))
    assert max((whole[k] - resumed_weights[k]).abs().max().item() for k in whole) == 0.0
