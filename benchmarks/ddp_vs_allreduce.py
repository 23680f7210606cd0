"""Several processes: accelerate's DDP (what the recipes run, library/engines.py) against the hand-made
all-reduce it replaced (one blocking all_reduce per trained tensor after backward), on the tiny SDXL LoRA
(U-Net and both text encoders' adapters), CPU processes over gloo.

    python benchmarks/ddp_vs_allreduce.py [--steps 5] [--warmup 2]

Prints a markdown table: time per optimizer step (the timed steps after the warm-up ones; on a shared CPU this
is noisy, the call counts are exact) and collective calls per step: gradient all-reduces (DDP: one per bucket,
counted by a comm hook; the old way: one per tensor) and the others (the NaN guard's one-flag reduce).

Recorded on the 2-core machine shared with other jobs (load average 10; times are noisy, counts exact):

| processes | gradient averaging | s / step | gradient all-reduce calls / step | other collectives / step |
|---|---|---|---|---|
| 1 | none (one process) | 0.630 | 0 | 0 |
| 2 | accelerate DDP (buckets, overlapped with backward) | 0.624 | 3 | 1 |
| 2 | old hand-made all-reduce (one per tensor, after backward) | 2.258 | 456 | 1 |

(tiny SDXL LoRA, U-Net + both text encoders, 456 trained tensors, 64 px, batch 1 per process, gloo, one thread
per process, 5 timed steps after 2 warm-up. DDP: one bucket per trained module here, the adapters being small;
a full-size SDXL LoRA with text encoders has about 1,600 trained tensors, in 25 MB buckets a few dozen calls.)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = [(1, "one process"), (2, "ddp"), (2, "allreduce")]


def _old_average_gradients(params: list, processes: int, all_reduce) -> int:
    """The replaced library/training.py average_gradients, as it was: per tensor, blocking, zeros injected.
    Returns the number of all-reduce calls."""
    import torch

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        all_reduce(p.grad)
        p.grad /= processes
    return len(params)


def run_rank(mode: str, steps: int, warmup: int) -> dict:
    """In each launched process: train warmup + steps steps of the tiny SDXL LoRA, counting collectives."""
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(ROOT))
    import train_network
    from library import engines, guards, progress
    from library.config_files import config_from_dict

    counts = {"grad": 0, "other": 0}
    in_hook = False
    all_reduce = dist.all_reduce

    def counted_all_reduce(tensor, *args, **kwargs):  # what goes through torch.distributed.all_reduce
        counts["other"] += not in_hook
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counted_all_reduce
    prepare = engines.prepare_trained

    def prepare_counting(accelerator, parts, trained):
        if mode == "allreduce":  # the old way: bare modules, gradients averaged before the optimizer step
            return engines.Prepared(list({id(m): m for m in trained}.values()), parts)
        prepared = prepare(accelerator, parts, trained)
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def hook(state, bucket):  # DDP's default: one all_reduce of the bucket, counted here only
            nonlocal in_hook
            counts["grad"] += 1
            in_hook = True
            try:
                return allreduce_hook(state, bucket)
            finally:
                in_hook = False

        for module in prepared.engine_modules:
            if hasattr(module, "register_comm_hook"):
                module.register_comm_hook(None, hook)
        return prepared

    engines.prepare_trained = prepare_counting
    step_ok = guards.NonFiniteGuard.step_ok

    def averaging_step_ok(self, params, max_grad_norm, step, accelerator, known_bad=False):
        if mode == "allreduce" and accelerator.num_processes > 1:
            counts["grad"] += _old_average_gradients(params, accelerator.num_processes, all_reduce)
        return step_ok(self, params, max_grad_norm, step, accelerator, known_bad)

    guards.NonFiniteGuard.step_ok = averaging_step_ok
    stamps, at_warmup = [], {}
    update = progress.Progress.update

    def timed(self, step, loss, lr):
        stamps.append(time.perf_counter())
        if step == warmup:
            at_warmup.update(counts)
        update(self, step, loss, lr)

    progress.Progress.update = timed
    out = ROOT / "benchmarks" / "_out" / f"ddp-{mode}"
    cfg = config_from_dict({
        "model": {"pretrained_model_name_or_path": str(ROOT / "quickstart" / "tiny-sdxl")},
        "network": {"network_dim": 4, "network_alpha": 2.0},
        "dataset": {"train_data_dir": str(ROOT / "quickstart" / "data"), "resolution": 64, "train_batch_size": 1,
                    "cache_latents": True},
        "optimizer": {"learning_rate": 1e-3},
        "train": {"output_dir": str(out), "max_train_steps": warmup + steps, "seed": 7},
        "save": {"overwrite": True}}, source="benchmark")
    result = train_network.train(cfg)
    per_step = {k: (counts[k] - at_warmup[k]) / steps for k in counts}
    trained = sum(p.numel() > 0 for c in result.adapted for p in c.parameters() if p.requires_grad)
    return {"s_per_step": (stamps[-1] - stamps[warmup - 1]) / steps, **per_step, "trained_tensors": trained,
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_rank(args.child, args.steps, args.warmup)), flush=True)
        return
    for what, path in (("sdxl", "quickstart/tiny-sdxl"), ("data", "quickstart/data")):
        if not (ROOT / path).exists():
            subprocess.run([sys.executable, "-m", "library.tiny", what, path], cwd=ROOT, check=True)
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "true"}
    rows = []
    for port, (processes, mode) in enumerate(MODES, start=29561):
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                              "--master_port", str(port), __file__, "--steps", str(args.steps), "--warmup",
                              str(args.warmup), "--child", mode], cwd=ROOT, capture_output=True, text=True, env=env)
        if run.returncode:
            sys.exit(run.stderr[-3000:])
        results = [json.loads(line[7:]) for line in run.stdout.splitlines() if line.startswith("RESULT ")]
        rows.append((processes, mode, max(results, key=lambda r: r["s_per_step"])))  # the slowest rank sets the pace
    print(f"tiny SDXL LoRA (U-Net + both text encoders, {rows[0][2]['trained_tensors']} trained tensors), 64 px, "
          f"batch 1 per process, CPU processes over gloo, 1 thread each; {args.steps} timed steps after "
          f"{args.warmup} warm-up\n")
    print("| processes | gradient averaging | s / step | gradient all-reduce calls / step | other collectives / step |")
    print("|---|---|---|---|---|")
    for processes, mode, r in rows:
        name = {"ddp": "accelerate DDP (buckets, overlapped with backward)", "allreduce":
                "old hand-made all-reduce (one per tensor, after backward)"}.get(mode, "none (one process)")
        print(f"| {processes} | {name} | {r['s_per_step']:.3f} | {r['grad']:.0f} | {r['other']:.0f} |")


if __name__ == "__main__":
    main()
