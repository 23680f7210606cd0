"""Tiny models of the real architectures, with random weights, and a small generated dataset: one module a family
(library/tiny/<family>.py), the tiny tokenizers (tokenizers.py), the single files beside the folders
(files.py) and the dataset (dataset.py).

Tests and the quickstart train these on a CPU. They are saved exactly as real models are distributed
(a diffusers folder, and a single file in the original layout), so loading them runs the same code a
real checkpoint goes through.

    python -m library.tiny sd1 quickstart/tiny-sd1      # folder + quickstart/tiny-sd1.safetensors
    python -m library.tiny sdxl out/tiny-sdxl           # folder + out/tiny-sdxl.safetensors (SAI layout)
    python -m library.tiny sd3 out/tiny-sd3             # folder + SAI single files + separate clip_l/clip_g/t5xxl
    python -m library.tiny flux-dev out/tiny-flux       # folder + BFL transformer + clip_l / t5xxl / ae files (= flux)
    python -m library.tiny flux-schnell out/tiny-schnell   # the same without the guidance input
    python -m library.tiny chroma out/tiny-chroma          # folder + Chroma transformer + t5xxl / ae files
    python -m library.tiny flux2 out/tiny-flux2            # FLUX.2 klein: folder + BFL transformer + text_encoder / ae
    python -m library.tiny flux2-dev out/tiny-flux2-dev    # FLUX.2 dev (Mistral3 text encoder, guidance input)
    python -m library.tiny qwen_image out/tiny-qwen        # folder + ComfyUI's transformer / text_encoder / vae files
    python -m library.tiny zimage out/tiny-zimage          # folder + Z-Image transformer + text_encoder / ae files
    python -m library.tiny anima out/tiny-anima            # modular-pipeline folder + DiT / text_encoder / vae files
    python -m library.tiny data quickstart/data         # 8 images with .txt captions
"""
from __future__ import annotations

import argparse

from library.tiny.anima import build_tiny_anima, save_tiny_anima
from library.tiny.chroma import build_tiny_chroma, save_tiny_chroma
from library.tiny.dataset import COLORS, SHAPES, make_dataset
from library.tiny.flux import build_tiny_flux, save_tiny_flux
from library.tiny.flux2 import build_tiny_flux2, save_tiny_flux2
from library.tiny.qwen_image import build_tiny_qwen_image, save_tiny_qwen_image, tiny_qwen_vl
from library.tiny.sd1 import SCHEDULER, build_tiny_sd1, save_tiny_sd1
from library.tiny.sd3 import build_tiny_sd3, save_tiny_sd3
from library.tiny.sdxl import build_tiny_sdxl, save_tiny_sdxl
from library.tiny.tokenizers import (tiny_clip_tokenizer, tiny_mistral_tokenizer, tiny_qwen25vl_tokenizer,
                                     tiny_qwen3_tokenizer, tiny_qwen_tokenizer, tiny_t5_tokenizer)
from library.tiny.zimage import build_tiny_zimage, save_tiny_zimage

__all__ = ["COLORS", "SCHEDULER", "SHAPES", "WHAT", "build_tiny_anima", "build_tiny_chroma", "build_tiny_flux",
           "build_tiny_flux2", "build_tiny_qwen_image", "build_tiny_sd1", "build_tiny_sd3", "build_tiny_sdxl",
           "build_tiny_zimage", "main", "make_dataset", "save_tiny_anima", "save_tiny_chroma", "save_tiny_flux",
           "save_tiny_flux2", "save_tiny_qwen_image", "save_tiny_sd1", "save_tiny_sd3", "save_tiny_sdxl",
           "save_tiny_zimage", "tiny_clip_tokenizer", "tiny_mistral_tokenizer", "tiny_qwen25vl_tokenizer",
           "tiny_qwen3_tokenizer", "tiny_qwen_tokenizer", "tiny_qwen_vl", "tiny_t5_tokenizer"]

# what `python -m library.tiny` builds: every family by its name (sd2 and the FLUX.1 variants too), and the data
WHAT = ("sd1", "sd2", "sdxl", "sd3", "flux", "flux-dev", "flux-schnell", "chroma", "flux2", "flux2-dev", "qwen_image",
        "zimage", "anima", "data")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=WHAT)
    parser.add_argument("out")
    args = parser.parse_args(argv)
    if args.what in ("sd1", "sd2"):
        written = save_tiny_sd1(args.out, v2=args.what == "sd2")
    elif args.what == "sdxl":
        written = save_tiny_sdxl(args.out)
    elif args.what == "sd3":
        written = tuple(save_tiny_sd3(args.out).values())
    elif args.what == "chroma":
        written = tuple(save_tiny_chroma(args.out).values())
    elif args.what.startswith("flux2"):
        written = tuple(save_tiny_flux2(args.out, dev=args.what == "flux2-dev").values())
    elif args.what == "qwen_image":
        written = tuple(save_tiny_qwen_image(args.out).values())
    elif args.what == "zimage":
        written = tuple(save_tiny_zimage(args.out).values())
    elif args.what == "anima":
        written = tuple(save_tiny_anima(args.out).values())
    elif args.what.startswith("flux"):
        written = tuple(save_tiny_flux(args.out, guidance=args.what != "flux-schnell").values())
    else:
        written = (make_dataset(args.out),)
    print("wrote " + ", ".join(str(p) for p in written))

