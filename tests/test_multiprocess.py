"""Multi-GPU is a configuration of accelerate: two processes on the CPU (gloo) end with identical adapter
weights on both ranks, equal to one process trained on the same global batch."""
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT

pytestmark = pytest.mark.slow

# Each rank trains, then writes its own copy of the adapter (the trainer itself writes from rank 0 only).
RANK_RUN = """
import sys, torch
from accelerate import PartialState
from library.config_files import load_config
from networks import files
import train_network
cfg = load_config(sys.argv[1])
result = train_network.train(cfg)
rank = PartialState().process_index
tensors, _ = files.adapter_tensors(result.adapted, "kohya", torch.float32)
from safetensors.torch import save_file
save_file(tensors, f"{cfg.train.output_dir}/rank{rank}.safetensors")
print("LOSSES", rank, result.losses)
"""


def _config(tmp_path, tiny_sd1, tiny_data, name, batch):
    path = tmp_path / f"{name}.toml"
    path.write_text(textwrap.dedent(f"""
        [model]
        pretrained_model_name_or_path = "{tiny_sd1[0]}"
        [network]
        network_dim = 4
        network_alpha = 2.0
        [dataset]
        train_data_dir = "{tiny_data}"
        resolution = 64
        train_batch_size = {batch}
        cache_latents = true  # latents drawn once per image (uncached, each process samples its own VAE noise)
        [optimizer]
        optimizer_type = "SGDNesterov"  # Adam would amplify float summation-order noise in near-zero gradients
        learning_rate = 0.05
        [train]
        output_dir = "{tmp_path / name}"
        max_train_steps = 4
        seed = 7
    """))
    return path


def test_two_processes_on_cpu_equal_one_process_with_the_same_global_batch(tmp_path, tiny_sd1, tiny_data):
    two = _config(tmp_path, tiny_sd1, tiny_data, "two", 2)
    one = _config(tmp_path, tiny_sd1, tiny_data, "one", 4)
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT),
           "ACCELERATE_USE_CPU": "true"}  # what `accelerate launch --cpu` sets: DDP over gloo
    script = tmp_path / "rank_run.py"
    script.write_text(RANK_RUN)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29531", str(script), str(two)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    single = subprocess.run([sys.executable, str(script), str(one)], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    rank0, rank1 = load_file(tmp_path / "two" / "rank0.safetensors"), load_file(tmp_path / "two" / "rank1.safetensors")
    alone = load_file(tmp_path / "one" / "rank0.safetensors")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # averaged gradients kept the ranks in step
    assert max(rank0[k].abs().max().item() for k in rank0 if k.endswith("lora_up.weight")) > 1e-3  # it trained
    worst = max((rank0[k] - alone[k]).abs().max().item() for k in rank0)
    assert worst < 1e-5, worst  # same examples, noise and timesteps; only the summation order differs
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if p.suffix == ".safetensors") == [
        "last.safetensors", "rank0.safetensors", "rank1.safetensors"]  # the trainer wrote once
