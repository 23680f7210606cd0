"""Speed and peak memory of the training step for a few memory switches, on the tiny SD1 model
(CPU) or on any model you point it at (GPU).

    python benchmarks/train_speed.py                      # tiny model, CPU; builds it under quickstart/
    python benchmarks/train_speed.py --config my.toml --steps 50

Each variant runs in its own process, so peak memory is per variant: the process's peak resident
memory (CPU) and torch.cuda.max_memory_allocated (GPU). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "LoRA (default)": [],
    "+ gradient checkpointing": ["train.gradient_checkpointing=true"],
    "+ cached latents and text outputs (U-Net only)": [
        "dataset.cache_latents=true", "train.cache_text_encoder_outputs=true", "network.network_train_unet_only=true"],
    "LoCon (conv_dim 8)": ["network.conv_dim=8", "network.conv_alpha=4"],
}


def run_one(config: str, overrides: list[str], steps: int, warmup: int) -> dict:
    """In a child process: train `warmup` + `steps` steps and time the last `steps`."""
    import torch

    sys.path.insert(0, str(ROOT))
    import train_network
    from library.config_files import load_config

    cfg = load_config(config, [*overrides, f"train.max_train_steps={steps + warmup}", "save.overwrite=true",
                               "logging.report_denoising_loss=false", "train.output_dir=\"benchmarks/_out\""])
    cfg.sample.sample_prompts = None
    stamps = []
    original = train_network.Progress.update

    def timed(self, step, loss, lr):
        stamps.append(time.perf_counter())
        original(self, step, loss, lr)

    train_network.Progress.update = timed
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    train_network.train(cfg)
    steps_per_s = steps / (stamps[-1] - stamps[warmup - 1])
    out = {"steps_per_s": steps_per_s, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["device"] = torch.cuda.get_device_name()
    else:
        out["device"] = f"CPU, {torch.get_num_threads()} threads"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "quickstart.toml"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_one(args.config, json.loads(args.child), args.steps, args.warmup)))
        return
    if args.config.endswith("quickstart.toml"):
        for what, path in (("sd1", "quickstart/tiny-sd1"), ("data", "quickstart/data")):
            if not (ROOT / path).exists():
                subprocess.run([sys.executable, "-m", "library.tiny", what, path], cwd=ROOT, check=True)
    rows = []
    for name, overrides in VARIANTS.items():
        child = subprocess.run([sys.executable, __file__, "--config", args.config, "--steps", str(args.steps),
                                "--warmup", str(args.warmup), "--child", json.dumps(overrides)],
                               cwd=ROOT, capture_output=True, text=True, check=True)
        result = json.loads(next(line[7:] for line in child.stdout.splitlines() if line.startswith("RESULT ")))
        rows.append((name, result))
    device = rows[0][1]["device"]
    print(f"config {Path(args.config).name}, {args.steps} timed steps after {args.warmup} warm-up, {device}\n")
    cuda = "cuda_peak_mib" in rows[0][1]
    print("| variant | steps/s | peak process RSS (MiB) |" + (" peak CUDA allocated (MiB) |" if cuda else ""))
    print("|---|---|---|" + ("---|" if cuda else ""))
    for name, r in rows:
        print(f"| {name} | {r['steps_per_s']:.2f} | {r['peak_rss_mib']:.0f} |"
              + (f" {r['cuda_peak_mib']:.0f} |" if cuda else ""))


if __name__ == "__main__":
    main()
