"""GPU acceptance check (issue 15, section 4): one command, on a CUDA machine, that runs

1. each family's tiny model (SD1, SDXL, SD3, FLUX.1, FLUX.2, Chroma, Qwen-Image, Z-Image, Anima) through both
   recipes (train_network, train_db) with the placement switches (cached latents / text outputs, gradient
   checkpointing, cpu_offload_checkpointing, fp8_base, a quantized base, blocks_to_swap, int8 T5, fp16 / bf16,
   the fused backward pass, sampling);
2. full-size random-weight models: SD1.5 LoRA at 512px, SDXL LoRA at 1024px with an fp8 base, FLUX.1-dev LoRA
   at 1024px with block swap (and without, where it fits);

and prints, per run and phase (caching, training, sampling, saving): torch.cuda.max_memory_allocated and
max_memory_reserved, the planner's figure for the training step (full-size runs), steps/s, and the block-swap
overhead against the same run without swap. A run that fails is a row naming its error; the others go on.

    python benchmarks/gpu_check.py [--tiny-only] [--out results.md]

It refuses to run without CUDA (exit 2). Full-size models are built from the shipped architecture configs with
random weights directly on the GPU and written to a temporary folder (FLUX.1-dev: ~34 GB of disk), so no
download is needed; tokenizers are the tiny ones (the token ids stay in range). Its parts that need no GPU (the
arguments, the list of runs and their configs, the table) are tested on the CPU: tests/test_gpu_check.py.
Status: written for the first GPU machine lent to the project; it has not run on one yet.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 2**30
PHASES = ("caching", "training", "sampling", "saving")
RECIPES = ("network", "db")


def _merged(*sections: dict) -> dict:
    """Config sections merged key by key (a later section's keys win)."""
    out: dict = {}
    for part in sections:
        for name, values in part.items():
            out[name] = {**out.get(name, {}), **values}
    return out


def _swap(blocks: int) -> dict:
    return {"train": {"gradient_checkpointing": True, "blocks_to_swap": blocks}}


FUSED_ADAMW = {"optimizer": {"optimizer_type": "AdamW", "fused_backward_pass": True, "max_grad_norm": 0.0}}
FUSED_ADAFACTOR = {"optimizer": {"optimizer_type": "Adafactor", "fused_backward_pass": True, "max_grad_norm": 0.0}}
DENOISER_ONLY = {"dreambooth": {"train_text_encoder": False}}
CACHED_TEXT = {"network": {"network_train_unet_only": True}, "train": {"cache_text_encoder_outputs": True}}
BF16 = {"train": {"mixed_precision": "bf16"}}

TINY_RUNS = [  # (family, label, recipe, sections): every family in both recipes
    ("sd1", "lora", "network", {}),
    ("sd1", "lora cached", "network", _merged(CACHED_TEXT, {"dataset": {"cache_latents": True}})),
    ("sd1", "lora checkpointing fp16", "network", {"train": {"gradient_checkpointing": True,
                                                             "mixed_precision": "fp16"}}),
    ("sd1", "qlora nf4", "network", {"model": {"base_model_precision": "nf4"}}),
    ("sd1", "db fused adafactor", "db", FUSED_ADAFACTOR),
    ("sdxl", "lora bf16 fp8_base", "network", _merged(BF16, {"train": {"fp8_base": True}})),
    ("sdxl", "db fused adafactor", "db", FUSED_ADAFACTOR),
    ("sd3", "lora cached", "network", CACHED_TEXT),
    ("sd3", "db swap", "db", _merged(_swap(2), FUSED_ADAMW, DENOISER_ONLY)),
    ("flux", "lora swap offload", "network", _merged(_swap(2), {"train": {"cpu_offload_checkpointing": True}})),
    ("flux", "lora int8 t5 cached mask", "network",
     _merged(CACHED_TEXT, {"model": {"t5xxl_precision": "int8", "apply_t5_attn_mask": True}})),
    ("flux", "db swap", "db", _merged(_swap(3), FUSED_ADAMW, DENOISER_ONLY)),
    ("flux2", "lora swap bf16", "network", _merged(_swap(3), BF16)),
    ("flux2", "db swap", "db", _merged(_swap(3), FUSED_ADAMW, DENOISER_ONLY)),
    ("chroma", "lora cached", "network", CACHED_TEXT),
    ("chroma", "db swap", "db", _merged(_swap(4), FUSED_ADAMW, DENOISER_ONLY)),
    ("qwen_image", "lora bf16 fp8_base swap", "network", _merged(_swap(1), BF16, {"train": {"fp8_base": True}})),
    ("qwen_image", "db fused adafactor", "db", _merged(FUSED_ADAFACTOR, DENOISER_ONLY)),
    ("zimage", "lora cached offload", "network",
     _merged(CACHED_TEXT, {"train": {"gradient_checkpointing": True, "cpu_offload_checkpointing": True}})),
    ("zimage", "db swap", "db", _merged(_swap(4), FUSED_ADAMW, DENOISER_ONLY)),
    ("anima", "lora cached", "network", CACHED_TEXT),
    ("anima", "db swap", "db", _merged(_swap(1), FUSED_ADAMW, DENOISER_ONLY)),
]
MODEL_KEYS = {family: {"t5xxl_max_token_length": 16} for family in ("sd3", "flux", "chroma")}  # as the tests


def tiny_folders(folder: Path) -> dict[str, Path]:
    """Each family's tiny model (library/tiny/), saved under `folder`: family -> its folder."""
    from library import tiny

    return {"sd1": tiny.save_tiny_sd1(folder / "sd1")[0], "sdxl": tiny.save_tiny_sdxl(folder / "sdxl")[0],
            "sd3": tiny.save_tiny_sd3(folder / "sd3")["folder"], "flux": tiny.save_tiny_flux(folder / "flux")["folder"],
            "flux2": tiny.save_tiny_flux2(folder / "flux2")["folder"],
            "chroma": tiny.save_tiny_chroma(folder / "chroma")["folder"],
            "qwen_image": tiny.save_tiny_qwen_image(folder / "qwen_image")["folder"],
            "zimage": tiny.save_tiny_zimage(folder / "zimage")["folder"],
            "anima": tiny.save_tiny_anima(folder / "anima")["folder"]}


def tiny_config(family: str, folder: Path, data: Path, out: Path, recipe: str, sections: dict,
                prompts: Path | None = None):
    """The validated config of one tiny run (model keys the family's tests use, then the run's sections)."""
    return config(folder, data, out, recipe, _merged({"model": MODEL_KEYS.get(family, {})}, sections),
                  prompts=prompts)


class PhasePeaks:
    """Peak allocated / reserved CUDA memory per phase of a run, measured by wrapping the library functions of
    its phases, which the recipes import when they run (caching: library.run.cache_and_place; sampling:
    library.sampling.render_samples; saving: Checkpointer.save); what is left is training. Times are
    wall-clock seconds per phase."""

    def __init__(self):
        self.peaks = {p: (0, 0) for p in PHASES}
        self.seconds = dict.fromkeys(PHASES, 0.0)

    def _close(self, phase: str, started: float) -> None:
        torch.cuda.synchronize()
        allocated, reserved = self.peaks[phase]
        self.peaks[phase] = (max(allocated, torch.cuda.max_memory_allocated()),
                             max(reserved, torch.cuda.max_memory_reserved()))
        self.seconds[phase] += time.perf_counter() - started
        torch.cuda.reset_peak_memory_stats()

    def wrap(self, phase: str, fn):
        def wrapped(*args, **kwargs):
            self._close("training", self._training_started)
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._close(phase, started)
                self._training_started = time.perf_counter()
        return wrapped

    @contextmanager
    def watching(self):
        from library import checkpoint, run, sampling

        saved = (run.cache_and_place, sampling.render_samples, checkpoint.Checkpointer.save)
        run.cache_and_place = self.wrap("caching", saved[0])
        sampling.render_samples = self.wrap("sampling", saved[1])
        checkpoint.Checkpointer.save = self.wrap("saving", saved[2])
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self._training_started = time.perf_counter()
        try:
            yield self
        finally:
            self._close("training", self._training_started)
            run.cache_and_place, sampling.render_samples, checkpoint.Checkpointer.save = saved


def run_once(cfg, recipe: str, planned: int | None = None) -> dict:
    """One run of `recipe` with its per-phase peaks and speed; a run that fails gives {"error": what} (the
    check goes on: a failure is a finding)."""
    import train_db
    import train_network

    module = train_network if recipe == "network" else train_db
    fresh_accelerate_state()
    peaks = PhasePeaks()
    try:
        with peaks.watching():
            result = module.train(cfg)
    except (Exception, SystemExit) as e:  # noqa: BLE001  (a recipe exits 2 / 3 on what it refuses)
        torch.cuda.empty_cache()
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]}
    steps = len(result.losses)
    return {"peaks": peaks.peaks, "seconds": peaks.seconds, "steps": steps,
            "steps_per_s": steps / max(peaks.seconds["training"], 1e-9), "planned": planned}


def fresh_accelerate_state() -> None:
    """accelerate keeps one process-wide state (the mixed precision of the first run): each run starts clean,
    as each test does (tests/conftest.py), or a run in another precision than the one before it is refused."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def planned_peak(cfg, recipe: str) -> int | None:
    from library.planner import plan, settings_from_config

    try:
        return plan(settings_from_config(cfg, recipe)).device_peak
    except Exception as e:  # the planner's own failure is a finding, not a reason to stop the check
        print(f"  planner failed: {type(e).__name__}: {e}")
        return None


def config(folder: Path, data: Path, out: Path, recipe: str, sections: dict, resolution: int = 64,
           steps: int = 4, prompts: Path | None = None):
    from library.config_files import config_from_dict

    raw = {"model": {"pretrained_model_name_or_path": str(folder)},
           "dataset": {"train_data_dir": str(data), "resolution": resolution, "train_batch_size": 1},
           "optimizer": {"learning_rate": 1e-4},
           "train": {"output_dir": str(out), "output_name": "check", "max_train_steps": steps, "seed": 1},
           "save": {"overwrite": True}}
    if recipe == "network":
        raw["network"] = {"network_dim": 16, "network_alpha": 8.0}
    if prompts is not None:
        raw["sample"] = {"sample_prompts": str(prompts), "sample_steps": 4}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return config_from_dict(raw, source="gpu_check")


# ---- full-size random-weight models ---------------------------------------------------------------------

PIPELINES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "flux-dev": "FluxPipeline"}


def random_model(arch: str, folder: Path, dtype: torch.dtype) -> Path:
    """A diffusers folder of the shipped architecture `arch` with random weights (built on the GPU)."""
    import json

    import diffusers
    import transformers

    from library.loading import arch_dir
    from library.tiny import tiny_clip_tokenizer, tiny_t5_tokenizer

    source = arch_dir(arch)
    parts = {}
    for sub in sorted(p for p in source.iterdir() if p.is_dir()):
        if sub.name == "scheduler":
            config = json.loads((sub / "scheduler_config.json").read_text())
            parts[sub.name] = getattr(diffusers, config["_class_name"]).from_config(config)
            continue
        config = json.loads((sub / "config.json").read_text())
        with torch.device("cuda"):
            if "_class_name" in config:
                model = getattr(diffusers, config["_class_name"]).from_config(config)
            else:
                cls = getattr(transformers, config["architectures"][0])
                model = cls(transformers.AutoConfig.from_pretrained(str(sub)))
        parts[sub.name] = model.to(dtype)
    with tempfile.TemporaryDirectory() as tmp:
        parts["tokenizer"] = tiny_clip_tokenizer(Path(tmp))
        if "text_encoder_2" in parts:
            t5 = isinstance(parts["text_encoder_2"], transformers.T5EncoderModel)
            parts["tokenizer_2"] = tiny_t5_tokenizer() if t5 else tiny_clip_tokenizer(Path(tmp))
        pipeline_class = getattr(diffusers, PIPELINES[arch])
        extra = {"safety_checker": None, "feature_extractor": None,
                 "requires_safety_checker": False} if arch == "sd15" else {}
        pipeline_class(**parts, **extra).save_pretrained(str(folder))
    del parts
    torch.cuda.empty_cache()
    return folder


FULL = [  # (label, arch, dtype, resolution, recipe sections)
    ("SD1.5 LoRA 512px", "sd15", torch.float16, 512,
     {"train": {"mixed_precision": "fp16", "gradient_checkpointing": True}}),
    ("SDXL LoRA 1024px fp8 base", "sdxl", torch.bfloat16, 1024,
     {"train": {"mixed_precision": "bf16", "fp8_base": True, "gradient_checkpointing": True}}),
    ("FLUX.1-dev LoRA 1024px", "flux-dev", torch.bfloat16, 1024,
     {"train": {"mixed_precision": "bf16", "gradient_checkpointing": True, "cache_text_encoder_outputs": True},
      "network": {"network_train_unet_only": True}, "dataset": {"cache_latents": True}}),
]
SWAP = {"train": {"blocks_to_swap": 18}}  # FLUX.1-dev: 18 of 57 blocks


# ---- the report -----------------------------------------------------------------------------------------

HEADER = ("| run | recipe | planned step GiB | caching GiB (alloc / reserved) | training | sampling | saving "
          "| steps/s | swap overhead |\n|---|---|---|---|---|---|---|---|---|")


def row(label: str, recipe: str, r: dict) -> str:
    """One table row: the run's per-phase peaks (GiB allocated / reserved), steps/s, swap overhead; or its
    error across the measured columns."""
    def gib(value):
        return f"{value / GIB:.2f}"

    if "error" in r:
        return "| " + " | ".join([label, recipe, "-", f"FAILED: {r['error']}".replace("|", "/"),
                                   *["-"] * 5]) + " |"
    cells = [label, recipe, gib(r["planned"]) if r["planned"] else "-"]
    for phase in PHASES:
        allocated, reserved = r["peaks"][phase]
        cells.append(f"{gib(allocated)} / {gib(reserved)}" if allocated else "-")
    cells += [f"{r['steps_per_s']:.2f}", r.get("swap_overhead", "-")]
    return "| " + " | ".join(cells) + " |"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny-only", action="store_true", help="skip the full-size models")
    parser.add_argument("--out", help="also write the table to this Markdown file")
    parser.add_argument("--multi-gpu", action="store_true", help="only the multi-GPU check (multi_gpu_check)")
    return parser.parse_args(argv)


NO_CUDA = ("gpu_check needs a CUDA GPU (torch.cuda.is_available() is False); the CPU test suite covers the rest "
           "(tests/test_device*.py run the recipes on a test device distinct from the host)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.multi_gpu:
        return multi_gpu_check(args.out)
    if not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    from library.cli import quiet_libraries

    quiet_libraries()
    lines = [f"{torch.cuda.get_device_name()} - torch {torch.__version__}", "", HEADER]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lines += tiny_rows(tmp)
        if not args.tiny_only:
            lines += full_size_rows(tmp)
    lines.append(f"\n{time.perf_counter() - started:.0f} s in all")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


def tiny_rows(tmp: Path) -> list[str]:
    """TINY_RUNS, each a row (printed as it comes)."""
    from library import tiny

    data = tiny.make_dataset(tmp / "data")
    prompts = tmp / "prompts.txt"
    prompts.write_text("a red circle --d 1\n")
    folders = tiny_folders(tmp / "tiny")
    rows = []
    for family, label, recipe, sections in TINY_RUNS:
        cfg = tiny_config(family, folders[family], data, tmp / "out", recipe, sections, prompts)
        rows.append(row(f"tiny {family} {label}", recipe, run_once(cfg, recipe)))
        print(rows[-1], flush=True)
    return rows


def full_size_rows(tmp: Path) -> list[str]:
    """FULL, each a row; FLUX.1-dev without and with block swap, and the overhead."""
    from library import tiny

    data = tiny.make_dataset(tmp / "data-1024", size=1024)
    rows = []
    for label, arch, dtype, resolution, sections in FULL:
        folder = random_model(arch, tmp / arch, dtype)
        cfg = config(folder, data, tmp / "out", "network", sections, resolution, steps=6)
        r = run_once(cfg, "network", planned_peak(cfg, "network"))
        if arch == "flux-dev":
            swap_cfg = config(folder, data, tmp / "out", "network", _merged(sections, SWAP), resolution, steps=6)
            swapped = run_once(swap_cfg, "network", planned_peak(swap_cfg, "network"))
            if "error" not in r and "error" not in swapped:
                swapped["swap_overhead"] = f"{r['steps_per_s'] / swapped['steps_per_s']:.2f}x"
            rows += [row(label + " no swap", "network", r), row(label + " blocks_to_swap 18", "network", swapped)]
        else:
            rows.append(row(label, "network", r))
        print(*rows[-2 if arch == "flux-dev" else -1:], sep="\n", flush=True)
        cleanup(tmp / arch)
    return rows
# ---- several GPUs (issue 19) ------------------------------------------------------------------------------

MULTI_GPU_TOML = """
[model]
pretrained_model_name_or_path = "{model}"
[dataset]
train_data_dir = "{data}"
resolution = 64
train_batch_size = {batch}
cache_latents = true
[optimizer]
optimizer_type = "SGDNesterov"
learning_rate = 0.05
max_grad_norm = 0.05
[train]
output_dir = "{out}"
max_train_steps = 4
seed = 7
mixed_precision = "{precision}"
[dreambooth]
train_text_encoder = false
[save]
save_every_n_steps = 2
save_state = true
"""


def multi_gpu_check(out: str | None = None) -> int:
    """`python benchmarks/gpu_check.py --multi-gpu` on a machine with 2 or more GPUs: the tiny SDXL full
    fine-tune under FSDP2 on 2 GPUs (`accelerate launch --use_fsdp --fsdp_version 2`, NCCL) against one process on
    the global batch (the largest weight difference; fp32 and bf16), its step-2 state resumed on 2 GPUs (the
    difference to the uninterrupted run), and, with deepspeed installed, the same under DeepSpeed ZeRO-2 and ZeRO-3
    (zero_lines)."""
    import subprocess

    from safetensors.torch import load_file

    from library import tiny

    if torch.cuda.device_count() < 2:
        print(f"--multi-gpu needs 2 GPUs, this machine has {torch.cuda.device_count()}", file=sys.stderr)
        return 2
    lines = [f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()} - torch {torch.__version__}"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data, model = tiny.make_dataset(tmp / "data"), tiny.save_tiny_sdxl(tmp / "sdxl")[0]

        def write(name: str, batch: int, precision: str, resume: str = "") -> Path:
            text = MULTI_GPU_TOML.format(model=model, data=data, batch=batch, out=tmp / name, precision=precision)
            path = tmp / f"{name}.toml"
            path.write_text(text.replace("save_state = true", f'resume = "{resume}"') if resume else text)
            return path

        def launch(config: Path, *engine: str, processes: int = 2) -> subprocess.CompletedProcess:
            command = [sys.executable, "-m", "accelerate.commands.launch", *engine, "--num_processes", str(processes),
                       "train_db.py", "--config", str(config)]
            return subprocess.run(command, capture_output=True, text=True, timeout=1800)

        def largest_difference(a: str, b: str) -> float:
            x, y = load_file(tmp / a / "last.safetensors"), load_file(tmp / b / "last.safetensors")
            return max((x[k].float() - y[k].float()).abs().max().item() for k in x)

        fsdp2 = ("--use_fsdp", "--fsdp_version", "2")
        for precision in ("no", "bf16"):
            started = time.perf_counter()
            two = launch(write(f"fsdp2-{precision}", 1, precision), *fsdp2)
            seconds = time.perf_counter() - started
            one = subprocess.run([sys.executable, "train_db.py", "--config", str(write(f"one-{precision}", 2,
                                  precision))], capture_output=True, text=True, timeout=1800)
            if two.returncode or one.returncode:
                lines.append(f"FSDP2 {precision}: exit {two.returncode} / {one.returncode}: "
                             f"{(two.stderr or one.stderr)[-2000:]}")
                continue
            lines.append(f"FSDP2 on 2 GPUs, mixed_precision {precision}: {seconds:.0f} s; largest weight difference "
                         f"to one process on the global batch "
                         f"{largest_difference(f'fsdp2-{precision}', f'one-{precision}'):.2e}")
        state = tmp / "fsdp2-no" / "last-step00000002-state"
        resumed = launch(write("resumed", 1, "no", str(state)), *fsdp2)
        lines.append(f"FSDP2 resume of {state.name}: exit {resumed.returncode}"
                     + (f", largest difference to the uninterrupted run {largest_difference('resumed', 'fsdp2-no'):.2e}"
                        if resumed.returncode == 0 else f": {resumed.stderr[-2000:]}"))
        import importlib.util

        if importlib.util.find_spec("deepspeed") is not None:
            lines += zero_lines(tmp, write, launch, largest_difference)
    text = "\n".join(lines)
    print(text)
    if out:
        Path(out).write_text(text + "\n", encoding="utf-8")
    return 0


ZERO_STAGES = (2, 3)


def zero_lines(tmp: Path, write, launch, largest_difference) -> list[str]:
    """multi_gpu_check's DeepSpeed part: the run of each precision under `accelerate launch --use_deepspeed
    --zero_stage N` (NCCL) for ZeRO-2 and ZeRO-3, each against one process on the global batch (one-{precision},
    which multi_gpu_check ran before), each stage's fp32 step-2 state resumed to the uninterrupted run, and an
    AdamW run's step-2 state resumed on 1 GPU (resharded through DeepSpeed's universal checkpoint) then that
    state on 2 GPUs, to the uninterrupted run."""
    lines = []
    for stage in ZERO_STAGES:
        zero = ("--use_deepspeed", "--zero_stage", str(stage))
        for precision in ("no", "bf16"):
            name = f"zero{stage}-{precision}"
            started = time.perf_counter()
            two = launch(write(name, 1, precision), *zero)
            seconds = time.perf_counter() - started
            lines.append(f"DeepSpeed ZeRO-{stage} on 2 GPUs, mixed_precision {precision}: exit {two.returncode}, "
                         + (f"{seconds:.0f} s; largest weight difference to one process on the global batch "
                            f"{largest_difference(name, f'one-{precision}'):.2e}" if two.returncode == 0
                            else two.stderr[-2000:]))
        state = tmp / f"zero{stage}-no" / "last-step00000002-state"
        resumed = launch(write(f"zero{stage}-resumed", 1, "no", str(state)), *zero)
        lines.append(f"DeepSpeed ZeRO-{stage} resume of {state.name}: exit {resumed.returncode}"
                     + (f", largest difference to the uninterrupted run "
                        f"{largest_difference(f'zero{stage}-resumed', f'zero{stage}-no'):.2e}"
                        if resumed.returncode == 0 else f": {resumed.stderr[-2000:]}"))
        lines.append(resharded_line(tmp, stage, write, launch, largest_difference))
    return lines


def resharded_line(tmp: Path, stage: int, write, launch, largest_difference) -> str:
    """An AdamW ZeRO run on 2 GPUs, its step-2 state resumed on 1 GPU to step 2, that state resumed on 2 GPUs to
    step 4: the largest difference to the uninterrupted run."""
    zero = ("--use_deepspeed", "--zero_stage", str(stage))

    def adamw(name: str, resume: str = "", steps: int = 4) -> Path:
        path = write(name, 1, "no", resume)
        path.write_text(path.read_text().replace('"SGDNesterov"', '"AdamW"').replace("learning_rate = 0.05",
                        "learning_rate = 0.001").replace("max_train_steps = 4", f"max_train_steps = {steps}")
                        .replace(f'resume = "{resume}"', f'resume = "{resume}"\nsave_state = true'))
        return path
    name = f"zero{stage}-adamw"
    runs = [launch(adamw(name), *zero)]
    runs.append(launch(adamw(f"{name}-one", str(tmp / name / "last-step00000002-state"), 2), *zero, processes=1))
    runs.append(launch(adamw(f"{name}-back", str(tmp / f"{name}-one" / "last-state")), *zero))
    failed = next((r for r in runs if r.returncode), None)
    if failed is not None:
        return f"DeepSpeed ZeRO-{stage} AdamW state 2 -> 1 -> 2 GPUs: exit {failed.returncode}: {failed.stderr[-2000:]}"
    return (f"DeepSpeed ZeRO-{stage} AdamW state 2 -> 1 -> 2 GPUs (resharded): largest difference to the "
            f"uninterrupted run {largest_difference(f'{name}-back', name):.2e}")


def cleanup(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
