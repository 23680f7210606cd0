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
from test_multiprocess import ENV, _config, _resuming

pytest.importorskip("deepspeed", reason="deepspeed is not installed (the test extra installs it)")
pytestmark = pytest.mark.slow

DB = """
    [dreambooth]
    train_text_encoder = false
"""


EMA = "use_ema = true\nema_decay = 0.5\n"  # in [dreambooth]: one process' AveragedModel, ZeRO-1/2's too


def _zero_env(stage: int, clip: float = 0.05) -> dict:
    """What `accelerate launch --use_deepspeed --zero_stage N --gradient_clipping 0.05 --gradient_accumulation_steps
    2` puts in the environment (no ACCELERATE_USE_CPU: accelerate would not set up DeepSpeed)."""
    env = {k: v for k, v in ENV.items() if k != "ACCELERATE_USE_CPU"}
    return {**env, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(stage),
            "ACCELERATE_GRADIENT_CLIPPING": str(clip), "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "2",
            "ACCELERATE_MIXED_PRECISION": "no"}


def _zero_run(config, stage: int, port: int, precision: str = "no", processes: int = 2, clip: float = 0.05):
    script = str(ROOT / "tests" / "deepspeed_cpu.py")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                          "--master_port", str(port), script, "--config", str(config)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**_zero_env(stage, clip), "ACCELERATE_MIXED_PRECISION": precision})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return run


def _configure(path, precision: str = "no", clip: float = 0.05):
    """3 steps of 2 accumulated micro-batches in `precision`, SGD with Nesterov momentum clipped by max_grad_norm
    0.05 (unclipped, `clip` 0, the weights move 0.032)."""
    path.write_text(path.read_text().replace("learning_rate = 0.05", f"learning_rate = 0.05\nmax_grad_norm = {clip}")
                    .replace("max_train_steps = 4", "max_train_steps = 3\ngradient_accumulation_steps = 2")
                    .replace("seed = 7", f'seed = 7\nmixed_precision = "{precision}"'))
    return path


@pytest.fixture(scope="module")
def alone(tmp_path_factory, tiny_sd1, tiny_data):
    """alone(precision, clip): one process on the global batch (2 images a micro-batch), 3 steps in that
    mixed_precision, clipped at `clip` (0: not): its weights file (each trained once for the module)."""
    files = {}

    def weights(precision: str = "no", clip: float = 0.05) -> dict:
        if (precision, clip) not in files:
            folder = tmp_path_factory.mktemp(f"alone-{precision}-{clip}")
            one = _configure(_config(folder, tiny_sd1, tiny_data, "one", 2, DB + EMA), precision, clip)
            single = subprocess.run([sys.executable, "train_db.py", "--config", str(one)], cwd=ROOT,
                                    capture_output=True, text=True, timeout=600, env=ENV)
            assert single.returncode == 0, single.stderr[-3000:]
            files[precision, clip] = load_file(folder / "one" / "last.safetensors")
            files[precision, clip, "ema"] = load_file(folder / "one" / "last-ema.safetensors")
        return files[precision, clip]
    weights.ema = lambda precision="no": (weights(precision), files[precision, 0.05, "ema"])[1]
    return weights


def _assert_one_process(zero: dict, alone: dict, base: dict, within: float = 1e-5, frozen=torch.float32,
                        clipped: bool = True) -> float:
    """The ZeRO run's weights file against one process': the same keys, the UNet trained (clipped) to the same
    weights `within`, the VAE and text encoder as loaded (stored in `frozen`, the run's weight dtype). Returns the
    largest difference."""
    assert set(zero) == set(alone) == set(base)
    unet = [k for k in alone if k.startswith("model.diffusion_model.")]
    moved = max((alone[k] - base[k]).abs().max().item() for k in unet)
    assert (1e-4 < moved < 0.01) if clipped else moved > 0.02, moved  # it trained (clipped: less far)
    worst = max((zero[k] - alone[k]).abs().max().item() for k in zero)
    print(f"largest difference to one process {worst:.1e}, the UNet moved {moved:.1e}")
    assert worst < within, worst
    assert all(torch.equal(zero[k], base[k].to(frozen).float()) for k in zero if k not in unet)  # VAE, text encoder
    return worst


@pytest.mark.parametrize("stage, precision, within, port", [(1, "no", 1e-5, 29551), (2, "no", 1e-5, 29557),
                                                        (2, "bf16", 2e-5, 29559)])
def test_zero1_and_zero2_full_fine_tune_equals_one_process_on_the_global_batch(tmp_path, tiny_sd1, tiny_data, alone,
                                                                             stage, precision, within, port):
    """ZeRO-1 (the optimizer state partitioned; accelerate skips DeepSpeed's all-reduce on the first micro-batch
    with no_sync) and ZeRO-2 (the gradients too), the module whole on each process; DeepSpeed's engine accumulates
    (1 image a micro-batch and process), clips and steps inside accelerator.backward (measured: 6e-8). bf16 as on
    one GPU: fp32 weights under autocast (measured: 4e-6; DeepSpeed's own bf16 mode, which rounds the weights to
    bf16 before making its fp32 masters, ends 4.9e-4 away); its final sample, rendered outside the engine, in the
    same autocast (without it the fp32 UNet met bf16 text embeddings: a RuntimeError)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --d 1 --s 2\n")
    sample = f'[sample]\nsample_prompts = "{prompts}"\nsample_steps = 2\n' if precision == "bf16" else ""
    ema = EMA if (stage, precision) == (2, "no") else ""  # the whole weights' AveragedModel on each process
    two = _configure(_config(tmp_path, tiny_sd1, tiny_data, "two", 1, DB + ema + sample), precision)
    run = _zero_run(two, stage, port, precision)
    assert "full fine-tune" in run.stdout
    if sample:
        assert [p.name for p in (tmp_path / "two" / "samples").iterdir()] == ["last_step00000003_00_1.png"]
    _assert_one_process(load_file(tmp_path / "two" / "last.safetensors"), alone(precision), load_file(tiny_sd1[1]),
                        within, torch.bfloat16 if precision == "bf16" else torch.float32)
    if ema:
        _assert_one_process(load_file(tmp_path / "two" / "last-ema.safetensors"), alone.ema(),
                            load_file(tiny_sd1[1]), within)


def test_unclipped_zero2_its_fp16_mode_and_torch_compile_equal_one_process(tmp_path, tiny_sd1, tiny_data, alone):
    """max_grad_norm = 0 is no clipping: written into DeepSpeed's config as 0 (accelerate leaves a 0 out, and
    DeepSpeed 0.19's default then clips at 1.0: the weights moved about a third as far as one process'). Unclipped,
    a gradient of the wrong scale shows (clipping to a norm hides it): ZeRO-2 ends at one process' weights (measured
    1.2e-7), and DeepSpeed's own fp16 mode (the module in fp16, fp32 master weights, dynamic loss scaling) within
    fp16's rounding of one process in fp32 (measured 2.4e-4, the weights having moved 0.032), the frozen VAE and text
    encoder written as loaded in fp16. ZeRO-2 with torch_compile (its blocks traced by dynamo with DeepSpeed's
    gradient hooks on their weights; the eager backend here, inductor by hand: 1.2e-7 too) likewise (1.2e-7)."""
    base, reference = load_file(tiny_sd1[1]), alone("no", 0.0)
    compiled = 'seed = 7\ntorch_compile = true\ndynamo_backend = "eager"'
    for name, precision, more, port, within, frozen in (
            ("fp32", "no", "", 29571, 1e-5, torch.float32), ("fp16", "fp16", "", 29573, 5e-4, torch.float16),
            ("compiled", "no", compiled, 29575, 1e-5, torch.float32)):
        config = _configure(_config(tmp_path, tiny_sd1, tiny_data, name, 1, DB), precision, 0.0)
        config.write_text(config.read_text().replace("seed = 7", more or "seed = 7"))
        run = _zero_run(config, 2, port, precision, clip=0.0)
        assert ("7 blocks compiled (eager)" in run.stdout) == (name == "compiled")
        _assert_one_process(load_file(tmp_path / name / "last.safetensors"), reference, base, within, frozen,
                            clipped=False)


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
    _assert_one_process(whole, alone(), load_file(tiny_sd1[1]))
    info = json.loads((state / "state.json").read_text())
    assert info["sharded"] == "deepspeed" and info["processes"] == 2 and info["step"] == 2
    assert {p.name for p in (state / "sharded" / "pytorch_model").iterdir()} == {
        f"zero_pp_rank_{i}_mp_rank_00_{kind}_states.pt" for i in (0, 1) for kind in ("model", "optim")}
    assert not list((tmp_path / "two").glob("*.tmp")) and not list((tmp_path / "two").glob("*.old"))
    losses = [[line.split()[3] for line in r.stdout.splitlines() if line.startswith("step ")] for r in (first, again)]
    assert len(losses[0]) == 3 and losses[1] == losses[0][2:]
    resumed_weights = load_file(tmp_path / "resumed" / "last.safetensors")
    assert max((whole[k] - resumed_weights[k]).abs().max().item() for k in whole) == 0.0


@pytest.mark.parametrize("stage, port", [(2, 29561), (3, 29567)])
def test_an_adamw_state_resumes_with_another_number_of_processes(tmp_path, tiny_sd1, tiny_data, stage, port):
    """A state saved by 2 processes at step 2 (AdamW: DeepSpeed reshards Adam's state only) resumed with 1: the
    main process converts it to DeepSpeed's universal checkpoint beside this run's outputs, the engine loads its
    own partition from it; resumed at its last step it writes the step-2 weights and a 1-process state holding
    the same fp32 masters and Adam moments (read back through the same conversion; measured 0.0). That state
    resumed with 2 processes trains steps 3 and 4 to the very losses and weights of the uninterrupted run
    (measured 0.0). The saved states are only read; the converted copy goes once loaded."""
    run = _config(tmp_path, tiny_sd1, tiny_data, "two", 1, DB + """
        [save]
        save_every_n_steps = 2
        save_state = true
    """)
    adamw = "learning_rate = 0.001\nmax_grad_norm = 0.05"
    run.write_text(run.read_text().replace('"SGDNesterov"', '"AdamW"').replace("learning_rate = 0.05", adamw)
                   .replace("max_train_steps = 4", "max_train_steps = 4\ngradient_accumulation_steps = 2"))
    state = tmp_path / "two" / "last-step00000002-state"

    first = _zero_run(run, stage, port)
    saved = {p: p.read_bytes() for p in state.rglob("*") if p.is_file()}
    one = _zero_run(_resuming(run, "one", state, 2), stage, port + 2, processes=1)
    back = _zero_run(_resuming(run, "back", tmp_path / "one" / "last-state", 4), stage, port + 4)
    assert "resharding the DeepSpeed state for 1 process " in one.stdout
    assert "resharding the DeepSpeed state for 2 processes " in back.stdout
    assert {p: p.read_bytes() for p in state.rglob("*") if p.is_file()} == saved
    for name in ("one", "back"):
        assert not [p.name for p in (tmp_path / name).iterdir() if "universal" in p.name]
    partitions = sorted(p.name for p in (tmp_path / "one" / "last-state" / "sharded" / "pytorch_model").iterdir())
    assert [p for p in partitions if "optim" in p] == ["zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    at_two, weights = (load_file(tmp_path / d / f) for d, f in (("two", "last-step00000002.safetensors"),
                                                                ("one", "last.safetensors")))
    assert max((at_two[k] - weights[k]).abs().max().item() for k in at_two) == 0.0
    moments = [_universal(folder / "sharded", tmp_path / f"u{i}")
               for i, folder in enumerate((state, tmp_path / "one" / "last-state"))]
    assert moments[0].keys() == moments[1].keys() and len(moments[0]) > 4 * 200  # fp32, exp_avg(_sq), step a weight
    assert all(torch.equal(moments[0][k], moments[1][k]) for k in moments[0])
    assert max(v.abs().max().item() for k, v in moments[0].items() if k.endswith("/exp_avg")) > 1e-4
    losses = [[line.split()[3] for line in r.stdout.splitlines() if line.startswith("step ") and " loss " in line]
              for r in (first, back)]
    assert len(losses[0]) == 4 and losses[1] == losses[0][2:]
    whole, resumed_weights = (load_file(tmp_path / name / "last.safetensors") for name in ("two", "back"))
    assert max((whole[k] - resumed_weights[k]).abs().max().item() for k in whole) == 0.0


def _universal(shards, folder) -> dict:
    """A DeepSpeed state's weights and optimizer state whole, through DeepSpeed's universal conversion:
    {"weight name/fp32" (or exp_avg, exp_avg_sq, step): tensor}."""
    from library.deepspeed_states import _convert

    _convert(shards, folder)
    zero = folder / "pytorch_model" / "zero"
    found = {f"{p.parent.name}/{p.stem}": torch.load(p, weights_only=False) for p in zero.glob("*/*.pt")}
    return {k: v["param"] if isinstance(v, dict) else torch.as_tensor(v) for k, v in found.items()}
