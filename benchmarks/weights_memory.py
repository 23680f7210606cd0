"""Device memory the denoiser's weights take during a training step, for the full-size FLUX.1-dev and
SD3-medium transformers, in bf16, with fp8_base, and with N blocks swapped to the CPU (blocks_to_swap).

Measured by the memory planner: the real LoRA training step (the recipe's casts, fp8 storage, block swapper
and gradient checkpointing) runs on fake tensors with no GPU and no weights, and the "weights" category is
read at the step's peak: frozen weights resident on the device then, including the swapped blocks in flight.
256 px, batch 1, cached latents and text outputs (the resolution does not change the weights).

    OMP_NUM_THREADS=1 python benchmarks/weights_memory.py [flux-dev] [sd3-medium]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ARCHS = {"flux-dev": ("flux", (0, 8, 16, 28, 36, 48)), "sd3-medium": ("sd3", (0, 8, 12, 16, 20))}
GIB = 2**30


def main(names: list[str]) -> None:
    from library.cli import quiet_libraries
    from library.config import NetworkSection
    from library.planner import plan
    from library.planner.step import StepSettings

    quiet_libraries()
    print("| architecture | blocks_to_swap | bf16 weights GiB | fp8_base weights GiB |")
    print("|---|---|---|---|")
    for name in names or list(ARCHS):
        family, counts = ARCHS[name]
        for n in counts:
            row = []
            for fp8 in (False, True):
                s = StepSettings(recipe="network", family=family, arch=name, width=256, height=256, batch_size=1,
                                 mixed_precision="bf16", gradient_checkpointing=True, cache_latents=True,
                                 cache_text_encoder_outputs=True, train_text_encoder=False, fp8_base=fp8,
                                 blocks_to_swap=n, network=NetworkSection(network_dim=16, network_alpha=16))
                row.append(plan(s).breakdown["weights"] / GIB)
            print(f"| {name} | {n} | {row[0]:.2f} | {row[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
