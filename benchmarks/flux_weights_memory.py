"""Device memory of the FLUX.1 transformer's weights (shipped architecture, meta device: no weights, no GPU),
in bf16, in fp8 storage (bf16 compute; norms and embeddings kept in bf16 as diffusers' layerwise casting
skips them), and with N of the 57 transformer blocks swapped to the CPU (the device holds the rest plus
one block in flight).

    python benchmarks/flux_weights_memory.py [flux-dev|flux-schnell]
"""
import sys
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from library.loading import arch_dir  # noqa: E402

GIB = 2**30


def main(name: str = "flux-dev") -> None:
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(str(arch_dir(name) / "transformer")))
    blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    linear = lambda m: sum(x.weight.numel() for x in m.modules() if isinstance(x, torch.nn.Linear))  # noqa: E731
    total, lin = count(model), linear(model)
    print(f"{name}: {total:,} parameters, {len(blocks)} blocks ({len(model.transformer_blocks)} double, "
          f"{len(model.single_transformer_blocks)} single); Linear weights {lin:,}")
    bf16 = total * 2
    fp8 = lin * 1 + (total - lin) * 2
    print(f"  bf16: {bf16 / GIB:.2f} GiB   fp8 storage (Linear weights): {fp8 / GIB:.2f} GiB")
    print("  blocks_to_swap N (the last N blocks, single-stream first, on the CPU; the device holds the rest plus "
          "one swapped block in flight):")
    for label, size in (("bf16", lambda m: count(m) * 2), ("fp8", lambda m: linear(m) + (count(m) - linear(m)) * 2)):
        whole, per_block = size(model), [size(b) for b in blocks]
        for n in (0, 8, 16, 28, 36):
            swapped = per_block[len(blocks) - n:] if n else []
            device = whole - sum(swapped) + (max(swapped) if swapped else 0)
            print(f"    {label} N={n:2d}: {device / GIB:6.2f} GiB")

if __name__ == "__main__":
    main(*sys.argv[1:])
