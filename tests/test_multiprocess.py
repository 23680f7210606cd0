"""Multi-GPU is a configuration of accelerate: two processes on the CPU (gloo) train through DDP (the trained
modules go through accelerator.prepare) and end with identical weights on both ranks, equal to one process
trained on the same global batch; no parameter without a gradient moves on any rank."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT

pytestmark = pytest.mark.slow

# Each rank trains, then writes its own copy of the trained weights (the trainer itself writes from rank 0 only)
# and a report: the engine's wrapper types, how many frozen tensors changed, and how many text-encoder tensors
# changed after stop_text_encoder_training froze them.
RANK_RUN = """
import json, sys, torch
from accelerate import PartialState
from safetensors.torch import save_file
from library import engines
from library.config_files import load_config
from networks import files
import train_db, train_network

recipe, cfg = sys.argv[1], load_config(sys.argv[2])
seen = {"engine": [], "frozen": {}, "stopped": {}}
prepare = engines.prepare_trained

def recording_prepare(accelerator, parts, trained):
    prepared = prepare(accelerator, parts, trained)
    seen["engine"] = [type(m).__name__ for m in prepared.engine_modules]
    modules = {"unet": parts.denoiser, "vae": parts.vae, **parts.text_encoders}
    seen["frozen"] = {f"{m}.{n}": p.detach().clone() for m, module in modules.items()
                      for n, p in module.named_parameters() if not p.requires_grad}
    seen["parts"] = parts
    return prepared
engines.prepare_trained = recording_prepare

stop = train_db._stop_training
def recording_stop(text_encoders, say, step):
    seen["stopped"] = {f"{i}.{n}": p.detach().clone() for i, e in enumerate(text_encoders)
                       for n, p in e.named_parameters()}
    seen["encoders"] = text_encoders
    return stop(text_encoders, say, step)
train_db._stop_training = recording_stop

result = (train_network if recipe == "network" else train_db).train(cfg)
rank = PartialState().process_index
if recipe == "network":
    tensors, _ = files.adapter_tensors(result.adapted, "kohya", torch.float32)
else:
    tensors = {f"unet.{k}": v for k, v in result.parts.denoiser.state_dict().items()}
    tensors.update({f"te.{k}": v for k, v in result.parts.text_encoders["te"].state_dict().items()})
save_file({k: v.float().contiguous() for k, v in tensors.items()}, f"{cfg.train.output_dir}/rank{rank}.safetensors")
parts = seen["parts"]
now = {f"{m}.{n}": p for m, module in {"unet": parts.denoiser, "vae": parts.vae, **parts.text_encoders}.items()
       for n, p in module.named_parameters()}
now_te = {f"{i}.{n}": p for i, e in enumerate(seen.get("encoders", [])) for n, p in e.named_parameters()}
changed = sum(not torch.equal(v, now[k]) for k, v in seen["frozen"].items())
stopped_changed = sum(not torch.equal(v, now_te[k]) for k, v in seen["stopped"].items())
print("REPORT", json.dumps({"rank": rank, "losses": result.losses, "engine": seen["engine"],
      "frozen": len(seen["frozen"]), "frozen_changed": changed, "stopped": len(seen["stopped"]),
      "stopped_changed": stopped_changed}))
"""

ENV = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT),
       "ACCELERATE_USE_CPU": "true"}  # what `accelerate launch --cpu` sets: DDP over gloo


def _config(tmp_path, tiny_sd1, tiny_data, name, batch, more=""):
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
    """) + textwrap.dedent(more))
    return path


def _reports(run) -> dict[int, dict]:
    reports = [json.loads(line[len("REPORT "):]) for line in run.stdout.splitlines() if line.startswith("REPORT ")]
    return {r["rank"]: r for r in reports}


def _two_and_one(tmp_path, recipe: str, two, one, port: int):
    """Trains `two` on 2 processes (torchrun, gloo) and `one` on one; returns the reports and saved weights."""
    script = tmp_path / "rank_run.py"
    script.write_text(RANK_RUN)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(port), str(script), recipe, str(two)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    single = subprocess.run([sys.executable, str(script), recipe, str(one)], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, env=ENV)
    assert single.returncode == 0, single.stderr[-3000:]
    out_two, out_one = tmp_path / two.stem, tmp_path / one.stem
    weights = [load_file(out_two / "rank0.safetensors"), load_file(out_two / "rank1.safetensors"),
               load_file(out_one / "rank0.safetensors")]
    return _reports(run), _reports(single)[0], weights


def test_two_processes_on_cpu_equal_one_process_with_the_same_global_batch(tmp_path, tiny_sd1, tiny_data):
    """DDP LoRA: both ranks hold the weights one process reaches on the global batch (within 1e-5: only the
    summation order differs); the frozen base is untouched on every rank; the trainer wrote one file."""
    two = _config(tmp_path, tiny_sd1, tiny_data, "two", 2)
    one = _config(tmp_path, tiny_sd1, tiny_data, "one", 4)
    reports, alone, (rank0, rank1, single) = _two_and_one(tmp_path, "network", two, one, 29531)
    assert reports[0]["engine"] == reports[1]["engine"] == ["DistributedDataParallel"] * 2  # unet, te
    assert alone["engine"] == ["UNet2DConditionModel", "CLIPTextModel"]  # one process: the bare modules
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # averaged gradients kept the ranks in step
    assert max(rank0[k].abs().max().item() for k in rank0 if k.endswith("lora_up.weight")) > 1e-3  # it trained
    worst = max((rank0[k] - single[k]).abs().max().item() for k in rank0)
    assert worst < 1e-5, worst  # same examples, noise and timesteps; only the summation order differs
    for r in (reports[0], reports[1]):
        assert r["frozen"] > 200 and r["frozen_changed"] == 0, r
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if p.suffix == ".safetensors") == [
        "last.safetensors", "rank0.safetensors", "rank1.safetensors"]  # the trainer wrote once


def test_ddp_full_fine_tune_with_accumulation_and_a_stopped_text_encoder(tmp_path, tiny_sd1, tiny_data):
    """DDP full fine-tune of the UNet and the text encoder, gradient accumulation 2 (no_sync on the first
    micro-batch), the text encoder frozen after step 1: both ranks end with one process's weights on the global
    batch, and the frozen text encoder does not move afterwards on any rank (SGD with Nesterov momentum would
    keep moving it if a zero gradient were averaged in, as the hand-made all-reduce did). Unclipped, so averaged
    gradients of the wrong scale would show (clipping to a norm hides the scale)."""
    more = """
        [dreambooth]
        train_text_encoder = true
        stop_text_encoder_training = 1
    """
    two = _config(tmp_path, tiny_sd1, tiny_data, "two", 1, more)
    one = _config(tmp_path, tiny_sd1, tiny_data, "one", 2, more)
    for path in (two, one):
        path.write_text(path.read_text().replace("max_train_steps = 4", "max_train_steps = 3\n"
                                                 "gradient_accumulation_steps = 2")
                        .replace("learning_rate = 0.05", "learning_rate = 0.02\nmax_grad_norm = 0.0"))  # unclipped:
    reports, alone, (rank0, rank1, single) = _two_and_one(tmp_path, "db", two, one, 29533)  # the gradients' scale shows
    assert reports[0]["engine"] == ["DistributedDataParallel"] * 2 and alone["engine"] == [
        "UNet2DConditionModel", "CLIPTextModel"]
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    worst = max((rank0[k] - single[k]).abs().max().item() for k in rank0)
    assert worst < 1e-5, worst
    moved = max((rank0[k] - load_file(str(tiny_sd1[0] / "unet" / "diffusion_pytorch_model.safetensors"))[k[5:]])
                .abs().max().item() for k in rank0 if k.startswith("unet.") and k.endswith(".weight"))
    assert moved > 1e-4, moved  # the UNet trained
    for r in (reports[0], reports[1], alone):
        assert r["stopped"] > 20 and r["stopped_changed"] == 0, r  # the text encoder stays where step 1 left it


def test_ddp_epochs_are_shared_and_a_state_resumes_exactly(tmp_path, tiny_sd1, tiny_data):
    """Two processes share each epoch's batches (8 images, 2 per batch and process: 2 steps an epoch, so
    max_train_epochs = 2 is 4 steps, not 8); a state saved at step 2 resumes on two processes to the weights of
    the uninterrupted run."""
    more = """
        [save]
        save_every_n_steps = 2
        save_state = true
    """
    run = _config(tmp_path, tiny_sd1, tiny_data, "run", 2, more)
    run.write_text(run.read_text().replace("max_train_steps = 4", "max_train_epochs = 2"))
    resumed = tmp_path / "resumed.toml"
    resumed.write_text(run.read_text().replace(f'"{tmp_path / "run"}"', f'"{tmp_path / "resumed"}"')
                       .replace("save_state = true", f'resume = "{tmp_path / "run" / "last-step00000002-state"}"'))
    script = tmp_path / "rank_run.py"
    script.write_text(RANK_RUN)
    reports = []
    for path in (run, resumed):
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", "29535", str(script), "network", str(path)],
                              cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        reports.append(_reports(done))
    assert len(reports[0][0]["losses"]) == 4 and len(reports[1][0]["losses"]) == 2
    assert reports[1][0]["losses"] == reports[0][0]["losses"][2:]
    first = load_file(tmp_path / "run" / "rank0.safetensors")
    again = load_file(tmp_path / "resumed" / "rank1.safetensors")
    assert max((first[k] - again[k]).abs().max().item() for k in first) < 1e-6


# train_db.py under FSDP2 on CPU processes. accelerate 1.15 makes its state FSDP only for GPU-like backends (state.py:
# the FSDP branch sits under MULTI_GPU / MULTI_XPU / ...), so on the CPU it stays MULTI_CPU and `accelerate launch
# --use_fsdp` runs N unsharded processes; this makes the CPU state FSDP2 with the trainer's own plugin once the
# Accelerator is built (torch's fully_shard itself runs on CPU over gloo).
FSDP2_RUN = """
import sys
import accelerate
from accelerate import PartialState
from accelerate.utils import DistributedType

class CpuFsdp2(accelerate.Accelerator):
    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        super().__init__(*args, **kwargs)
        assert fsdp_plugin is not None and fsdp_plugin.fsdp_version == 2
        PartialState().distributed_type = DistributedType.FSDP  # AcceleratorState copies it from here
        self.state.distributed_type = DistributedType.FSDP
        self.state.fsdp_plugin = fsdp_plugin

accelerate.Accelerator = CpuFsdp2
import train_db
sys.exit(train_db.main(sys.argv[1:]))
"""
FSDP2_ENV = {**ENV, "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}  # what `--use_fsdp --fsdp_version 2` sets
FSDP2_DB = """
    [dreambooth]
    train_text_encoder = true  # sharded with the UNet (each its own unit), frozen after step 2
    stop_text_encoder_training = 2
    use_ema = true
    ema_decay = 0.5  # far from the weights after 3 steps, so a wrong average shows
"""


def _fsdp2_run(tmp_path, config, port: int, processes: int = 2):
    script = tmp_path / "fsdp2_run.py"
    script.write_text(FSDP2_RUN)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                          "--master_port",
                          str(port), str(script), "--config", str(config)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env=FSDP2_ENV)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return run


def _fsdp2_configs(tmp_path, tiny_sd1, tiny_data, more=""):
    """The FSDP2 run (1 image per process and step) and one process on the global batch (2)."""
    two = _config(tmp_path, tiny_sd1, tiny_data, "two", 1, FSDP2_DB + more)
    one = _config(tmp_path, tiny_sd1, tiny_data, "one", 2, FSDP2_DB + more)
    for path in (two, one):
        path.write_text(path.read_text().replace("learning_rate = 0.05", "learning_rate = 0.05\nmax_grad_norm = 0.05")
                        .replace("max_train_steps = 4", "max_train_steps = 3"))
    return two, one


def test_fsdp2_full_fine_tune_equals_one_process_on_the_global_batch(tmp_path, tiny_sd1, tiny_data):
    """FSDP2 on 2 CPU processes (gloo): the UNet sharded a unit per block (SD1's block_classes) and the trained
    text encoder a unit per layer, both in one sharded model (frozen after step 2: SGD's momentum must not move
    it at step 3), the gradients clipped over the shards (max_grad_norm 0.05 clips: unclipped the weights move
    0.035), SGD on the shards; the weights file the main process writes from the gathered shards equals one
    process on the global batch within 1e-5 (measured 1.5e-8, the text encoder 7e-9); the frozen VAE is written
    untouched; the EMA (each process averaging its own shards, gathered for the -ema file) is one process'
    AveragedModel's within 1e-5 (measured 1.5e-8); the final sample, rendered by both processes and written by
    the main one, is one process' image."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --d 1 --s 2\n")
    two, one = _fsdp2_configs(tmp_path, tiny_sd1, tiny_data, f'''
        [sample]
        sample_prompts = "{prompts}"
        sample_steps = 2
    ''')
    run = _fsdp2_run(tmp_path, two, 29541)
    assert "full fine-tune" in run.stdout
    single = subprocess.run([sys.executable, "train_db.py", "--config", str(one)], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, env=ENV)
    assert single.returncode == 0, single.stderr[-3000:]
    sharded, alone = load_file(tmp_path / "two" / "last.safetensors"), load_file(tmp_path / "one" / "last.safetensors")
    base = load_file(tiny_sd1[1])
    assert set(sharded) == set(alone) == set(base)
    unet = [k for k in alone if k.startswith("model.diffusion_model.")]
    moved = max((alone[k] - base[k]).abs().max().item() for k in unet)
    assert 1e-4 < moved < 0.01, moved  # it trained, clipped
    worst = max((sharded[k] - alone[k]).abs().max().item() for k in sharded)
    assert worst < 1e-5, worst
    te = [k for k in alone if k.startswith("cond_stage_model.")]
    assert max((alone[k] - base[k]).abs().max().item() for k in te) > 1e-4  # the text encoder trained too
    assert all(torch.equal(sharded[k], base[k]) for k in sharded if k.startswith("first_stage_model."))  # VAE
    # the EMA: each process averaged its shards, gathered into the -ema file; one process' AveragedModel's
    sharded_ema, alone_ema = (load_file(tmp_path / name / "last-ema.safetensors") for name in ("two", "one"))
    assert set(sharded_ema) == set(base)
    assert max((sharded_ema[k] - alone_ema[k]).abs().max().item() for k in sharded_ema) < 1e-5
    assert max((sharded_ema[k] - sharded[k]).abs().max().item() for k in unet) > moved / 10  # not the weights
    # every process sampled (the sharded forward needs them all), the main process wrote the one image
    import numpy as np
    from PIL import Image

    images = [sorted((tmp_path / name / "samples").iterdir()) for name in ("two", "one")]
    assert [p.name for p in images[0]] == [p.name for p in images[1]] == ["last_step00000003_00_1.png"]
    pixels = [np.asarray(Image.open(p[0]), dtype=np.int16) for p in images]
    assert np.abs(pixels[0] - pixels[1]).max() <= 1


def test_ddp_sdxl_lora_with_a_text_encoder_layer_no_step_uses(tmp_path, tiny_sdxl, tiny_data):
    """SDXL conditions on the first text encoder's penultimate layer, so the adapters of its last layer get no
    gradient on any process: DDP is told to look for unused parameters (else it stops at the second step,
    waiting for their gradients), leaves them without one, and they stay at their initial zeros, as they do in
    one process; the rest trains as one process on the global batch."""
    two = _config(tmp_path, tiny_sdxl, tiny_data, "two", 2)
    one = _config(tmp_path, tiny_sdxl, tiny_data, "one", 4)
    for path in (two, one):
        path.write_text(path.read_text().replace("max_train_steps = 4", "max_train_steps = 2"))
    reports, alone, (rank0, rank1, single) = _two_and_one(tmp_path, "network", two, one, 29539)
    assert reports[0]["engine"] == ["DistributedDataParallel"] * 3  # unet, te1, te2
    te1_layers = {int(k.split("_layers_")[1].split("_")[0]) for k in rank0 if k.startswith("lora_te1_")}
    last = f"lora_te1_text_model_encoder_layers_{max(te1_layers)}_"
    unused = [k for k in rank0 if k.startswith(last) and k.endswith("lora_up.weight")]
    assert unused and all(not rank0[k].any() and not rank1[k].any() and not single[k].any() for k in unused)
    used = [k for k in rank0 if k.startswith("lora_te1_") and not k.startswith(last) and k.endswith("lora_up.weight")]
    assert max(rank0[k].abs().max().item() for k in used) > 1e-4  # the other layers trained
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert max((rank0[k] - single[k]).abs().max().item() for k in rank0) < 1e-5


def test_fsdp2_state_is_saved_sharded_and_resumes_with_any_number_of_processes(tmp_path, tiny_sd1, tiny_data):
    """FSDP2 states: each process writes its shards of the weights and the optimizer state and its RNGs through
    accelerator.save_state, into the temporary folder renamed into place once all have written. A state saved by
    2 processes at step 2 resumes with 1 (torch.distributed.checkpoint reshards as it loads): resumed at its last
    step, it writes the step-2 weights and a state of the same optimizer state (measured: 0.0; likewise with 3
    processes, left out for time); that 1-process state resumed with 2 processes trains steps 3 and 4 to the very
    losses, weights and EMA weights of the uninterrupted run (measured: 0.0; the EMA's shards ride in the state's
    sharded/ema). The text encoder, sharded with the UNet and frozen at step 2, does not move after it."""
    more = """
        [save]
        save_every_n_steps = 2
        save_state = true
    """
    run, _ = _fsdp2_configs(tmp_path, tiny_sd1, tiny_data, more)
    run.write_text(run.read_text().replace("max_train_steps = 3", "max_train_steps = 4"))
    state = tmp_path / "two" / "last-step00000002-state"

    first = _fsdp2_run(tmp_path, run, 29543)
    one = _fsdp2_run(tmp_path, _resuming(run, "one", state, 2), 29545, processes=1)
    back = _fsdp2_run(tmp_path, _resuming(run, "back", tmp_path / "one" / "last-state", 4), 29549)
    shards = state / "sharded"
    assert sorted(p.name for p in state.iterdir()) == ["sharded", "state.json", "state.pt"]
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert sorted(p.name for p in (shards / part).iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert (shards / "random_states_0.pkl").is_file() and (shards / "random_states_1.pkl").is_file()
    assert sorted(p.name for p in (shards / "ema").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    info = json.loads((state / "state.json").read_text())
    assert info["sharded"] == "fsdp2" and info["processes"] == 2 and info["step"] == 2
    assert not list((tmp_path / "two").glob("*.tmp")) and not list((tmp_path / "two").glob("*.old"))
    assert "saved by 2 processes, this run has 1" in one.stdout
    at_two, saved_moments = load_file(tmp_path / "two" / "last-step00000002.safetensors"), _dcp_optimizer(state)
    assert json.loads((tmp_path / "one" / "last-state" / "state.json").read_text())["processes"] == 1
    weights = load_file(tmp_path / "one" / "last.safetensors")
    assert max((at_two[k] - weights[k]).abs().max().item() for k in at_two) == 0.0
    moments = _dcp_optimizer(tmp_path / "one" / "last-state")
    assert moments.keys() == saved_moments.keys() and len(moments) > 200  # SGD's momentum of every UNet weight
    assert all(torch.equal(moments[k], saved_moments[k]) for k in moments)
    assert max(v.abs().max().item() for v in moments.values()) > 1e-3
    losses = [[line.split()[3] for line in r.stdout.splitlines() if line.startswith("step ") and " loss " in line]
              for r in (first, back)]
    assert len(losses[0]) == 4 and losses[1] == losses[0][2:]
    at_four = load_file(tmp_path / "two" / "last.safetensors")  # the text encoder stopped at step 2: not moved
    assert all(torch.equal(at_four[k], at_two[k]) for k in at_two if k.startswith("cond_stage_model."))
    for file in ("last.safetensors", "last-ema.safetensors"):  # the EMA's shards resharded like the weights
        whole, resumed_weights = (load_file(tmp_path / name / file) for name in ("two", "back"))
        assert max((whole[k] - resumed_weights[k]).abs().max().item() for k in whole) == 0.0, file


def _resuming(run, name: str, folder, steps: int):
    """`run`'s config (writing to the "two" folder beside it, saving states) as a run `name` that resumes the
    state `folder` and trains to `steps`."""
    path = run.parent / f"{name}.toml"
    path.write_text(run.read_text().replace(f'"{run.parent / "two"}"', f'"{run.parent / name}"')
                    .replace("save_state = true", f'save_state = true\nresume = "{folder}"')
                    .replace("max_train_steps = 4", f"max_train_steps = {steps}"))
    return path


def _dcp_optimizer(state) -> dict:
    """The optimizer state of an FSDP2 state folder, whole (torch.distributed.checkpoint's files read back
    into one dict): {"parameter.momentum_buffer": tensor}."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    whole = state.parent / f"{state.name}.pt"
    dcp_to_torch_save(state / "sharded" / "optimizer_0", whole)
    saved = torch.load(whole, weights_only=True)["optimizer"]["state"]
    return {f"{name}.{key}": value for name, values in saved.items() for key, value in values.items()}
