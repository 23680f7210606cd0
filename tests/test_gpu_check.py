"""benchmarks/gpu_check.py's parts that need no GPU (issue 15, section 4): it refuses without CUDA in one line
(exit 2), its arguments, its list of runs (every family in both recipes, each config valid, each label saying
what its switches are), and the table it prints."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check  # noqa: E402


def test_refuses_without_cuda_in_one_line(capsys):
    assert gpu_check.main([]) == 2 and gpu_check.main(["--tiny-only"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == [gpu_check.NO_CUDA] * 2 and "CUDA" in gpu_check.NO_CUDA
    with pytest.raises(SystemExit) as bad:
        gpu_check.main(["--tiny_only"])
    assert bad.value.code == 2


def test_arguments():
    args = gpu_check.parse_args([])
    assert (args.tiny_only, args.out) == (False, None)
    args = gpu_check.parse_args(["--tiny-only", "--out", "table.md"])
    assert (args.tiny_only, args.out) == (True, "table.md")


SWITCHES = {  # a word of a run's label -> (section, key, value) its config must have
    "swap": ("train", "gradient_checkpointing", True),
    "cached": ("train", "cache_text_encoder_outputs", True),
    "offload": ("train", "cpu_offload_checkpointing", True),
    "fp8_base": ("train", "fp8_base", True),
    "bf16": ("train", "mixed_precision", "bf16"),
    "fp16": ("train", "mixed_precision", "fp16"),
    "nf4": ("model", "base_model_precision", "nf4"),
    "int8 t5": ("model", "t5xxl_precision", "int8"),
    "fused": ("optimizer", "fused_backward_pass", True),
}


def test_every_family_runs_in_both_recipes_with_valid_configs(tmp_path):
    from library.families import REGISTRY

    runs = gpu_check.TINY_RUNS
    assert {(family, recipe) for family, _, recipe, _ in runs} == {(f, r) for f in REGISTRY for r in gpu_check.RECIPES}
    assert len({(family, label) for family, label, _, _ in runs}) == len(runs) == 22
    folder, data = tmp_path / "model", tmp_path / "data"
    folder.mkdir(), data.mkdir(), (tmp_path / "p.txt").write_text("a red circle\n")
    for family, label, recipe, sections in runs:
        cfg = gpu_check.tiny_config(family, folder, data, tmp_path / "out", recipe, sections, tmp_path / "p.txt")
        for word, (section, key, value) in SWITCHES.items():
            if word in label:
                assert getattr(getattr(cfg, section), key) == value, (family, label, key)
        assert bool(cfg.train.blocks_to_swap) == ("swap" in label), (family, label)
        assert (cfg.dreambooth.train_text_encoder is False) == (recipe == "db" and family not in ("sd1", "sdxl"))
        assert cfg.model.t5xxl_max_token_length == (16 if family in ("sd3", "flux", "chroma") else None)
        assert cfg.sample.sample_prompts == str(tmp_path / "p.txt")


def test_table_rows():
    ok = {"peaks": {"caching": (2 * 2**30, 3 * 2**30), "training": (2**29, 2**30), "sampling": (0, 0),
                    "saving": (2**28, 2**28)}, "steps_per_s": 1.234, "planned": 5 * 2**29, "swap_overhead": "1.50x"}
    assert gpu_check.row("tiny sd1 lora", "network", ok) == (
        "| tiny sd1 lora | network | 2.50 | 2.00 / 3.00 | 0.50 / 1.00 | - | 0.25 / 0.25 | 1.23 | 1.50x |")
    failed = gpu_check.row("tiny flux db swap", "db", {"error": "ConfigError: a | b"})
    assert failed == "| tiny flux db swap | db | - | FAILED: ConfigError: a / b | - | - | - | - | - |"
    header = gpu_check.HEADER.splitlines()
    assert len({line.count("|") for line in [*header, failed, gpu_check.row("x", "db", {**ok, "planned": None})]}) == 1


def test_a_run_that_fails_is_a_row_and_the_check_goes_on(monkeypatch):
    """A run's failure is its row; and each run starts with accelerate's state fresh (its process-wide mixed
    precision refused every run after the first in another precision)."""
    import torch

    import train_db
    import train_network

    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda: 2**31)

    def refused(cfg):  # noqa: ARG001
        raise SystemExit(3)

    def trained_in(precision: str):
        def train(cfg):  # noqa: ARG001
            from accelerate import Accelerator

            Accelerator(mixed_precision=precision, cpu=True)  # as a recipe's start() does
            return type("Result", (), {"losses": [1.0] * 4})()
        return train

    monkeypatch.setattr(train_network, "train", trained_in("bf16"))
    monkeypatch.setattr(train_db, "train", refused)
    assert gpu_check.run_once(None, "network")["steps"] == 4
    assert gpu_check.run_once(None, "db") == {"error": "SystemExit: 3"}
    monkeypatch.setattr(train_db, "train", trained_in("no"))
    assert gpu_check.run_once(None, "db")["steps"] == 4  # fp32 after bf16 in the same process
    measured = gpu_check.run_once(None, "network")
    assert measured["steps"] == 4 and measured["peaks"]["training"] == (2**30, 2**31) and measured["steps_per_s"] > 0
    assert measured["peaks"]["saving"] == (0, 0)  # no save ran


def test_zero_lines_launch_each_stage_and_compare_with_one_process(tmp_path):
    """The DeepSpeed part of --multi-gpu: ZeRO-2 and ZeRO-3 each launched with `--use_deepspeed --zero_stage N`
    in fp32 and bf16, compared with one-{precision}, each fp32 run's step-2 state resumed under the same
    stage, compared with it, and an AdamW run's step-2 state resumed on 1 GPU (resharded) and that state on 2,
    compared with the AdamW run; a failed launch shows its exit code and error."""
    import subprocess

    written, launched, compared = [], [], []

    def write(name, batch, precision, resume=""):
        written.append((name, batch, precision, resume))
        text = gpu_check.MULTI_GPU_TOML.format(model="m", data="d", batch=batch, out=tmp_path / name,
                                               precision=precision)
        path = tmp_path / f"{name}.toml"
        path.write_text(text.replace("save_state = true", f'resume = "{resume}"') if resume else text)
        return path

    def launch(config, *engine, processes=2):
        launched.append((config.stem, engine[-1], processes))
        failed = config.stem == "zero3-bf16"
        return subprocess.CompletedProcess([], 1 if failed else 0, "", "boom" if failed else "")

    def largest_difference(a, b):
        compared.append((a, b))
        return 1.5e-7

    lines = gpu_check.zero_lines(tmp_path, write, launch, largest_difference)
    assert launched == [(name, stage, processes) for stage in "23" for name, processes in (
        (f"zero{stage}-no", 2), (f"zero{stage}-bf16", 2), (f"zero{stage}-resumed", 2), (f"zero{stage}-adamw", 2),
        (f"zero{stage}-adamw-one", 1), (f"zero{stage}-adamw-back", 2))]
    assert written[2] == ("zero2-resumed", 1, "no", str(tmp_path / "zero2-no" / "last-step00000002-state"))
    one = (tmp_path / "zero2-adamw-one.toml").read_text()
    assert 'optimizer_type = "AdamW"' in one and "max_train_steps = 2" in one and "save_state = true" in one
    assert f'resume = "{tmp_path / "zero2-adamw" / "last-step00000002-state"}"' in one
    back = (tmp_path / "zero2-adamw-back.toml").read_text()
    assert f'resume = "{tmp_path / "zero2-adamw-one" / "last-state"}"' in back
    assert compared == [("zero2-no", "one-no"), ("zero2-bf16", "one-bf16"), ("zero2-resumed", "zero2-no"),
                        ("zero2-adamw-back", "zero2-adamw"), ("zero3-no", "one-no"), ("zero3-resumed", "zero3-no"),
                        ("zero3-adamw-back", "zero3-adamw")]
    assert lines[0].startswith("DeepSpeed ZeRO-2 on 2 GPUs, mixed_precision no: exit 0, ") and "1.50e-07" in lines[0]
    assert lines[3] == ("DeepSpeed ZeRO-2 AdamW state 2 -> 1 -> 2 GPUs (resharded): largest difference to the "
                        "uninterrupted run 1.50e-07")
    assert lines[5] == "DeepSpeed ZeRO-3 on 2 GPUs, mixed_precision bf16: exit 1, boom"
    assert lines[6] == ("DeepSpeed ZeRO-3 resume of last-step00000002-state: exit 0, largest difference to the "
                        "uninterrupted run 1.50e-07")
