"""Trainable parameters and saved file size of every adapter algorithm at the default settings
(network_dim 4, network_alpha 1, no conv layers, LoKr factor -1, OFT / BOFT block size 4), on the
full-size SD1.5 architecture (library/arch/sd15) and the SDXL base architecture (a config written
here; the SDXL family is not shipped yet). Models are built on the meta device: no weights, no GPU;
only the adapter tensors are real (zeros), and each file is written once to measure it.

    python benchmarks/adapter_sizes.py            # U-Net + text encoder(s), as a default run trains
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.families.base import AdapterTarget  # noqa: E402
from library.families.sd1 import kohya_block_index  # noqa: E402
from library.loading import arch_dir, read_json  # noqa: E402
from networks import algorithms, files, lycoris_format, peft_format  # noqa: E402
from networks.settings import NetworkSettings  # noqa: E402
from networks.targets import inject, trainable_parameter_count  # noqa: E402

ALGOS = {"lora": ("lora", "kohya"), "loha": ("loha", "kohya"), "lokr": ("lokr", "kohya"),
         "dora": ("dora", "kohya"), "oft": ("oft", "kohya"), "boft": ("boft", "kohya")}
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                 attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, hidden_act="quick_gelu")
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280, hidden_act="gelu")
TE_PARENTS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


def build(arch: str):
    """(modules, targets) of the architecture, on the meta device."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_target = AdapterTarget("denoiser", "lora_unet", ("Transformer2DModel",),
                                ("ResnetBlock2D", "Downsample2D", "Upsample2D"), block_index=kohya_block_index)
    with torch.device("meta"):
        if arch == "sd15":
            folder = arch_dir("sd15")
            unet = UNet2DConditionModel.from_config(read_json(folder / "unet" / "config.json"))
            te = CLIPTextModel(CLIPTextConfig(**read_json(folder / "text_encoder" / "config.json")))
            return {"denoiser": unet, "te": te}, [unet_target, AdapterTarget("te", "lora_te", TE_PARENTS)]
        unet = UNet2DConditionModel(**SDXL_UNET)
        te1, te2 = CLIPTextModel(CLIPTextConfig(**CLIP_L)), CLIPTextModel(CLIPTextConfig(**CLIP_G))
    return ({"denoiser": unet, "te1": te1, "te2": te2},
            [unet_target, AdapterTarget("te1", "lora_te1", TE_PARENTS), AdapterTarget("te2", "lora_te2", TE_PARENTS)])


def measure(arch: str, algo: str, fmt: str) -> tuple[int, int, int]:
    """(layers, trainable parameters, file bytes) at the defaults."""
    modules, targets = build(arch)
    settings = NetworkSettings(algo=algo, module="networks.lora" if algo == "lora" else "lycoris.kohya")
    adapted = [inject(modules[t.component], t, settings) for t in targets]
    tensors = {k: torch.zeros(v.shape) for k, v in file_tensors(adapted, fmt).items()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "a.safetensors"
        files.save(path, tensors, {"ss_network_args": str(settings.as_args())})
        size = os.path.getsize(path)
    return sum(len(c.layers) for c in adapted), trainable_parameter_count(adapted), size


def file_tensors(adapted, fmt: str) -> dict[str, torch.Tensor]:
    """The file's keys with (meta) tensors of the right shapes, named as networks/ names them."""
    out = {}
    for c in adapted:
        for path, layer in c.adapter_layers():
            if fmt == "peft":
                out.update({f"{peft_format.prefix(c)}.{path}.{n}": p for n, p in algorithms.parameters(layer).items()})
                continue
            name = lycoris_format.kohya_name(c.target, path)
            out.update({f"{name}.{k}": v for k, v in algorithms.file_tensors(c.algo, layer).items()})
            out[f"{name}.alpha"] = torch.zeros(())
    return out


def main() -> None:
    print("| architecture | algorithm | file layout | layers | trainable parameters | file size (fp32) |")
    print("|---|---|---|---|---|---|")
    for arch in ("sd15", "sdxl"):
        for name, (algo, fmt) in ALGOS.items():
            layers, params, size = measure(arch, algo, fmt)
            print(f"| {arch} | {name} | {fmt} | {layers} | {params:,} | {size / 2**20:.2f} MiB |", flush=True)


if __name__ == "__main__":
    main()
