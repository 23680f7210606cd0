"""Data-path speed: indexing and bucketing a generated 100,000-image dataset from headers only, the dataset
check as a training run does it, and loading cached latents against the training step they feed.

    python benchmarks/data_speed.py                       # 100,000 images under /tmp/latent-trainer-bench
    python benchmarks/data_speed.py --images 20000 --folder /tmp/x

The images are JPEGs of 24 sizes (512..2048 px, aspect ratios 1:4..4:1), each file made unique by a JPEG
comment, in 100 folders '1_class_k' with a .txt caption each. Each measurement runs in its own process, so
peak memory is its own: the process's peak RSS, and how much of it the measurement added after the imports
(torch, PIL). Timings exclude the imports. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIDES = [(512, 2048), (576, 1792), (640, 1536), (704, 1408), (768, 1344), (832, 1216), (896, 1152), (960, 1088),
         (1024, 1024), (1088, 960), (1152, 896), (1216, 832), (1344, 768), (1408, 704), (1536, 640), (1792, 576),
         (2048, 512), (600, 800), (800, 600), (1200, 900), (900, 1200), (1920, 1080), (1080, 1920), (700, 700)]


def generate(folder: Path, count: int) -> None:
    from PIL import Image

    templates = []
    for k, size in enumerate(SIDES):
        buffer = io.BytesIO()
        Image.new("RGB", size, (40 + 8 * k, 90, 160)).save(buffer, "JPEG", quality=60)
        templates.append(buffer.getvalue())
    for i in range(count):
        sub = folder / f"1_class_{i // 1000:03d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        comment = f"image {i}".encode()
        data = templates[i % len(templates)]
        # SOI, then a COM segment (unique bytes per file), then the rest of the JPEG
        (sub / f"{i:06d}.jpg").write_bytes(data[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big")
                                          + comment + data[2:])
        (sub / f"{i:06d}.txt").write_text(f"class {i // 1000}, image {i}")


def measure(what: str, folder: Path) -> dict:
    """In a child process: one measurement, with its wall time and peak memory."""
    sys.path.insert(0, str(ROOT))
    import torch  # noqa: F401  (imported before the baseline, as in a training run)

    import library.data.plan  # noqa: F401

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"index": index_and_bucket, "check": dataset_check, "latents": cached_latents}[what](folder)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["added_rss_mib"] = out["peak_rss_mib"] - baseline
    return out


def index_and_bucket(folder: Path) -> dict:
    from library.data.buckets import BucketSettings, bucket_sizes, choose_bucket
    from library.data.images import list_images, read_header

    settings = BucketSettings((1024, 1024), True, 256, 2048, 64, False)
    sizes = bucket_sizes(settings)
    start = time.perf_counter()
    buckets = {}
    n = 0
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        for path in list_images(sub):
            h = read_header(path)
            b = choose_bucket((h.width, h.height), settings, sizes)
            buckets[b] = buckets.get(b, 0) + 1
            n += 1
    return {"images": n, "per_s": n / (time.perf_counter() - start), "buckets": len(buckets)}


def dataset_check(folder: Path) -> dict:
    from library.config_files import config_from_dict
    from library.data.plan import plan_data

    cfg = config_from_dict({"model": {"pretrained_model_name_or_path": "-"}, "train": {"output_dir": "-"},
                            "dataset": {"train_data_dir": str(folder), "resolution": 1024, "enable_bucket": True,
                                        "max_bucket_reso": 2048, "check_decode": False}},
                           check_paths=False)
    start = time.perf_counter()
    plan = plan_data(cfg, say=lambda line: None)
    return {"images": len(plan.images), "per_s": len(plan.images) / (time.perf_counter() - start),
            "problems": len(plan.skipped)}


def cached_latents(folder: Path, count: int = 2000) -> dict:
    """Latents of SD1 at 512 px (4x64x64) on disk, read through the training DataLoader."""
    import torch

    from library.config_files import config_from_dict
    from library.data.buckets import BucketBatchSampler
    from library.data.cache import LatentCacheSettings, cache_latents
    from library.data.plan import plan_data
    from library.data.training_set import TrainingSet, collate

    small = folder.parent / (folder.name + "-latents") / "1_x"
    if not small.is_dir():
        from PIL import Image

        small.mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (64, 64), (i % 256, i // 256, 0)).save(small / f"{i:05d}.png")
            (small / f"{i:05d}.txt").write_text("x")
    cfg = config_from_dict({"model": {"pretrained_model_name_or_path": "-"}, "train": {"output_dir": "-"},
                            "dataset": {"train_data_dir": str(small.parent), "resolution": 64}}, check_paths=False)
    dataset = TrainingSet(plan_data(cfg, say=lambda line: None), 0, 1.0)

    class Shapes:  # writes latents of the SD1 512-px shape whatever the image
        name = "bench"

        def encode_images(self, parts, pixels, generator=None):
            return torch.randn(len(pixels), 4, 64, 64, generator=generator)

    parts = type("P", (), {"vae": torch.nn.Linear(1, 1)})()
    cache_latents(Shapes(), parts, dataset, LatentCacheSettings(True, small.parent.parent / "cache", 16, 0),
                  say=lambda line: None)
    rates = {}
    for workers in (0, 2):
        generator = torch.Generator().manual_seed(0)
        loader = torch.utils.data.DataLoader(dataset, collate_fn=collate, num_workers=workers, generator=generator,
                                             batch_sampler=BucketBatchSampler(dataset.bucket_keys,
                                                                              {k: 4 for k in dataset.bucket_keys},
                                                                              generator))
        start = time.perf_counter()
        seen = sum(len(batch["latents"]) for batch in loader)
        rates[workers] = seen / (time.perf_counter() - start)
    return {"images": len(dataset), "per_s_workers0": rates[0], "per_s_workers2": rates[2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--folder", default="/tmp/latent-trainer-bench/images")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = Path(args.folder)
    if args.child:
        print(json.dumps(measure(args.child, folder)))
        return
    if not (folder / f"1_class_{(args.images - 1) // 1000:03d}").is_dir():
        start = time.perf_counter()
        generate(folder, args.images)
        print(f"generated {args.images} images in {time.perf_counter() - start:.0f}s", file=sys.stderr)
    results = {}
    for what in ("index", "check", "latents"):
        run = subprocess.run([sys.executable, __file__, "--folder", str(folder), "--child", what],
                             capture_output=True, text=True, check=True)
        results[what] = json.loads(run.stdout.strip().splitlines()[-1])
    print(json.dumps(results, indent=1), file=sys.stderr)
    print("| measurement | images | images/s | peak RSS (MiB) | added by it (MiB) |\n|---|---|---|---|---|")
    for what, label in (("index", "index + bucket from headers"), ("check", "dataset check, headers only")):
        r = results[what]
        print(f"| {label} | {r['images']:,} | {r['per_s']:,.0f} | {r['peak_rss_mib']:.0f} | "
              f"{r['added_rss_mib']:.0f} |")
    r = results["latents"]
    print(f"| cached latents 4x64x64 from disk, batch 4, 0 / 2 workers | {r['images']:,} | "
          f"{r['per_s_workers0']:,.0f} / {r['per_s_workers2']:,.0f} | {r['peak_rss_mib']:.0f} | "
          f"{r['added_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
