"""Disk caches: what an entry records, reuse while valid, rebuild when stale (VAE, image, flip, caption,
text encoder), atomic files, and caching alone from the command line before a training run reuses it."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import torch
from safetensors import safe_open

from conftest import ROOT
from data_files import caption, config, image, snapshot
from library.data.cache import LatentCacheSettings, cache_latents, cache_text_outputs
from library.data.plan import plan_data
from library.data.training_set import TrainingSet


class FakeFamily:
    """Encodes by 8x8 average pooling (and caption length): fast, and counts what it encodes."""
    name = "fake"

    def __init__(self):
        self.images, self.prompts = 0, 0

    def encode_images(self, parts, pixels, generator=None):
        self.images += len(pixels)
        return torch.nn.functional.avg_pool2d(pixels, 8) * parts.vae.weight[0, 0]

    def encode_prompts(self, parts, captions, clip_skip):
        self.prompts += len(captions)
        return {"hidden": torch.tensor([[float(len(c) * clip_skip)] for c in captions])}


def _parts(scale=1.0):
    vae, te = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.constant_(vae.weight, scale)
    torch.nn.init.constant_(te.weight, 1.0)
    return SimpleNamespace(vae=vae, text_encoders={"te": te})


def _dataset(tmp_path, **dataset):
    folder = tmp_path / "images"
    for name, size in (("a", (64, 64)), ("b", (96, 48))):
        if not (folder / f"{name}.png").exists():
            caption(image(folder / f"{name}.png", size), f"caption {name}")
    cfg = config(tmp_path, train_data_dir=str(folder), cache_latents_to_disk=True, **dataset)
    return TrainingSet(plan_data(cfg, lambda line: None), 1, 1.0)


def _cache(tmp_path, ds, family, parts, lines=None):
    settings = LatentCacheSettings(True, tmp_path / "cache", 2, 0)
    cache_latents(family, parts, ds, settings, (lines if lines is not None else []).append)


def test_latents_are_written_with_their_dependencies_and_reused(tmp_path):
    family, lines = FakeFamily(), []
    ds = _dataset(tmp_path)
    before = snapshot(tmp_path / "images")
    _cache(tmp_path, ds, family, _parts(), lines)
    assert family.images == 2 and lines == [f"latents: 2 images, 0 reused from {tmp_path / 'cache' / 'latents'}, "
                                            f"2 encoded (2 missing)"]
    files = sorted((tmp_path / "cache" / "latents").iterdir())
    assert [f.name.split("-")[0] for f in files] == ["a", "b"] and all(f.suffix == ".safetensors" for f in files)
    with safe_open(str(ds.latent_files[1]), "pt") as f:
        record = json.loads(f.metadata()["depends_on"])
        assert f.get_tensor("latents").shape == (3, 8, 8)  # bucket 64x64 / 8
    assert {k: record[k] for k in ("kind", "family", "resized", "crop", "bucket", "flip_variant", "alpha_mask")} == {
        "kind": "latents", "family": "fake", "resized": [128, 64], "crop": [0, 32], "bucket": [64, 64],
        "flip_variant": False, "alpha_mask": False}
    assert record["image"]["path"] == str((tmp_path / "images" / "b.png").resolve())
    from safetensors.torch import load_file

    assert torch.equal(ds[(1, 1)]["latents"], load_file(ds.latent_files[1])["latents"])  # read from the file
    again, lines = FakeFamily(), []
    _cache(tmp_path, _dataset(tmp_path), again, _parts(), lines)
    assert again.images == 0 and "2 reused" in lines[0]
    assert snapshot(tmp_path / "images") == before  # nothing written beside the images


def test_stale_entries_are_rebuilt_never_reused(tmp_path):
    _cache(tmp_path, _dataset(tmp_path), FakeFamily(), _parts())
    family, lines = FakeFamily(), []
    _cache(tmp_path, _dataset(tmp_path), family, _parts(scale=2.0), lines)  # other VAE weights
    assert family.images == 2 and lines[0].endswith("2 encoded (2 stale: vae changed)")
    os.utime(tmp_path / "images" / "a.png", ns=(1, 1))  # the image file changed
    family, lines = FakeFamily(), []
    ds = _dataset(tmp_path)
    _cache(tmp_path, ds, family, _parts(scale=2.0), lines)
    assert family.images == 1 and lines[0].endswith("1 encoded (1 stale: image changed)")
    family, lines = FakeFamily(), []
    flipped = _dataset(tmp_path, flip_aug=True)
    _cache(tmp_path, flipped, family, _parts(scale=2.0), lines)
    assert family.images == 4 and lines[0].endswith("2 encoded (2 stale: flip_variant changed)")  # both variants
    assert torch.allclose(flipped.cached(0, True)["latents"], flipped.cached(0, False)["latents"].flip(-1))


def test_bucket_change_gives_another_entry(tmp_path):
    _cache(tmp_path, _dataset(tmp_path), FakeFamily(), _parts())
    family, lines = FakeFamily(), []
    ds = _dataset(tmp_path, enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16)
    _cache(tmp_path, ds, family, _parts(), lines)
    assert family.images == 1 and ds.cached(1, False)["latents"].shape == (3, 6, 10)  # b: bucket 80x48


def test_half_written_files_are_never_trusted(tmp_path):
    ds = _dataset(tmp_path)
    _cache(tmp_path, ds, FakeFamily(), _parts())
    ds.latent_files[0].write_bytes(ds.latent_files[0].read_bytes()[:50])  # a file cut short (not by us)
    family, lines = FakeFamily(), []
    _cache(tmp_path, _dataset(tmp_path), family, _parts(), lines)
    assert family.images == 1 and lines[0].endswith("(1 stale: unreadable file)")
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.name.endswith(".tmp")]


def test_text_encoder_outputs_on_disk(tmp_path):
    family, lines = FakeFamily(), []
    out = cache_text_outputs(family, _parts(), ["a dog", "a cat"], 1, tmp_path / "cache", lines.append)
    assert family.prompts == 2 and out["a dog"]["hidden"].tolist() == [[5.0]]
    again = FakeFamily()
    assert cache_text_outputs(again, _parts(), ["a dog", "a cat"], 1, tmp_path / "cache", lines.append)[
        "a cat"]["hidden"].tolist() == [[5.0]] and again.prompts == 0
    other = _parts()
    torch.nn.init.constant_(other.text_encoders["te"].weight, 3.0)
    third = FakeFamily()
    cache_text_outputs(third, other, ["a dog"], 2, tmp_path / "cache", lines.append)
    assert third.prompts == 1 and lines[-1].endswith("1 encoded (1 missing)")  # clip_skip is in the name
    cache_text_outputs(third, other, ["a dog"], 1, tmp_path / "cache", lines.append)
    assert lines[-1].endswith("1 encoded (1 stale: text_encoders changed)")


def test_caching_alone_then_training_reuses_it(tmp_path, tiny_sd1, tiny_data):
    config_file = tmp_path / "run.toml"
    config_file.write_text(f"""
[model]
pretrained_model_name_or_path = "{tiny_sd1[0]}"
[network]
network_train_unet_only = true
[dataset]
train_data_dir = "{tiny_data}"
resolution = 64
train_batch_size = 2
cache_latents_to_disk = true
flip_aug = true
[train]
output_dir = "{tmp_path / 'out'}"
max_train_steps = 2
seed = 3
cache_text_encoder_outputs_to_disk = true
""")
    run = subprocess.run([sys.executable, "-m", "library.data.cache", "--config", str(config_file)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"latents: 8 images, 0 reused from {tmp_path / 'out' / 'cache' / 'latents'}, 8 encoded" in run.stdout
    assert "text-encoder outputs: 8 captions, 0 reused, 8 encoded (8 missing)" in run.stdout
    run = subprocess.run([sys.executable, str(ROOT / "train_network.py"), "--config", str(config_file)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "latents: 8 images, 8 reused" in run.stdout and "text-encoder outputs: 8 captions, 8 reused" in run.stdout
    assert "step 2/2" in run.stdout
