"""The dataset check: a matrix of bad inputs, each with its message; the policy stops with the whole list or
skips with warnings and trains; nothing is ever written into the user's folders."""
import functools
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from data_files import caption, config, image, snapshot
from library.data import DatasetError
from library.data.plan import plan_data


@functools.cache
def _bomb_png() -> bytes:
    """A real 1-bit 16000x16000 PNG (256 M pixels, over Pillow's 2 x MAX_IMAGE_PIXELS), 31 kB on disk."""
    width = height = 16000
    raw = zlib.compress(bytes((1 + width // 8) * height), 9)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def _bad_folder(root):
    """One good image, one of each bad input, and valid but unusual images (16-bit, CMYK, palette with
    transparency: these train); returns {file name: expected reason} for the problems."""
    d = root / "data"
    caption(image(d / "good.png"), "good")
    (d / "zero.png").write_bytes(b"")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    full = image(d / "whole.png", (64, 64)).read_bytes()
    (d / "whole.png").unlink()
    (d / "truncated.png").write_bytes(full[: len(full) // 2])
    full = image(d / "whole.jpg", (64, 64), quality=90).read_bytes()
    (d / "whole.jpg").unlink()
    (d / "truncated.jpg").write_bytes(full[: len(full) // 2])
    image(d / "cmyk.jpg", (64, 64), mode="CMYK")
    Image.fromarray(np.full((64, 64), 40000, np.uint16)).save(d / "deep.png")
    palette = Image.new("P", (64, 64), 1)
    palette.info["transparency"] = 0
    palette.save(d / "palette.png", transparency=0)
    image(d / "small.png", (10, 10))
    (d / "bomb.png").write_bytes(_bomb_png())
    exif = Image.Exif()
    exif[0x0112] = 8
    image(d / "rotated.jpg", (64, 64), exif=exif.tobytes())
    image(d / "nocaption.png")
    caption(image(d / "emptycaption.png"), "  ")
    caption(image(d / "latin1.png"), b"caf\xe9")
    (d / "good_copy.png").write_bytes((d / "good.png").read_bytes())
    (d / "3_empty").mkdir()
    for name in ("zero", "corrupt", "truncated", "cmyk", "deep", "palette", "small", "rotated", "bomb"):
        for path in d.glob(f"{name}.*"):
            caption(path, name)
    caption(d / "good_copy.png", "copy")
    return d, {
        "zero.png": "empty file (0 bytes)",
        "corrupt.png": "corrupt: not a readable image (UnidentifiedImageError",
        "truncated.png": "truncated: the PNG has no IEND chunk at its end",
        "truncated.jpg": "truncated: the JPEG has no end-of-image marker",
        "bomb.png": f"decompression bomb: 256,000,000 pixels, more than twice Pillow's limit of "
                    f"{Image.MAX_IMAGE_PIXELS:,} (PIL.Image.MAX_IMAGE_PIXELS); it is not decoded",
        "small.png": "too small: 10x10 would be enlarged 6.4x to 64x64 (more than 2x)",
        "nocaption.png": "no caption file nocaption.txt and no class tokens (from a folder name or class_tokens)",
        "emptycaption.png": "caption file emptycaption.txt is empty",
        "latin1.png": "caption file latin1.txt is not UTF-8 (byte 0xe9 at offset 3)",
        "good_copy.png": f"duplicate of {d / 'good.png'}",
        "3_empty": "empty folder: no images (.bmp, .jpeg, .jpg, .png, .webp)",
    }


def test_stop_lists_every_problem_with_path_and_reason(tmp_path):
    folder, expected = _bad_folder(tmp_path)
    before = snapshot(folder)
    with pytest.raises(DatasetError) as e:
        plan_data(config(tmp_path, train_data_dir=str(folder)), lambda line: None)
    message = str(e.value)
    assert message.startswith(f"{len(expected)} problem(s) in the training data (dataset.bad_data = \"stop\"")
    for name, reason in expected.items():
        assert f"  {folder / name}: {reason}" in message, name
    for name in ("rotated.jpg", "cmyk.jpg", "deep.png", "palette.png"):  # handled, not problems
        assert name not in message
    assert snapshot(folder) == before


def test_skip_warns_and_keeps_the_good_images(tmp_path):
    folder, expected = _bad_folder(tmp_path)
    lines = []
    plan = plan_data(config(tmp_path, train_data_dir=str(folder), bad_data="skip"), lines.append)
    assert sorted(r.path.name for r in plan.images) == ["cmyk.jpg", "deep.png", "good.png", "palette.png",
                                                        "rotated.jpg"]
    warnings = [line for line in lines if line.startswith("warning: skipped ")]
    assert len(warnings) == len(expected)
    assert f"warning: skipped {folder / 'small.png'}: {expected['small.png']}" in warnings
    assert f"note: {folder / 'rotated.jpg'}: EXIF orientation 8: trained as displayed (64x64)" in lines


def test_decoding_finds_what_headers_do_not(tmp_path):
    folder = tmp_path / "d"
    data = bytearray(image(folder / "x.jpg", (64, 64), quality=90).read_bytes())
    caption(folder / "x.jpg", "x")
    start = data.index(b"\xff\xda") + 20  # inside the entropy-coded data: the header and the end stay intact
    data[start:start + 200] = b"\xff\xd0" * 100  # stray restart markers
    (folder / "x.jpg").write_bytes(bytes(data))
    assert plan_data(config(tmp_path, train_data_dir=str(folder), check_decode=False), print).images
    try:
        plan = plan_data(config(tmp_path, train_data_dir=str(folder)), print)
    except DatasetError as e:
        assert "x.jpg: corrupt: decoding failed" in str(e) or "truncated" in str(e)
    else:  # libjpeg recovers from some damage with a warning; then the image is readable
        assert plan.images


def test_nothing_found_says_where_and_why(tmp_path):
    image(tmp_path / "d" / "images" / "a.png")
    with pytest.raises(DatasetError) as e:
        plan_data(config(tmp_path, train_data_dir=str(tmp_path / "d"), bad_data="skip"), lambda line: None)
    assert str(e.value).splitlines() == [
        f"no training images found (looked in: no folder)",
        f"  skipped folder {tmp_path / 'd' / 'images'}: its name does not start with 'N_' (N = repeats), "
        f"e.g. '10_images'"]


def test_check_runs_alone_on_a_dataset_toml(tmp_path):
    folder, expected = _bad_folder(tmp_path)
    toml = tmp_path / "d.toml"
    toml.write_text(f'[general]\nresolution = 64\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{folder}"\n')
    run = subprocess.run([sys.executable, "-m", "library.data.check", "--config", str(toml)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 3, run.stderr
    assert run.stderr.startswith(f"dataset error: {len(expected) - 1} problem(s) in the training data")  # no 3_empty
    for name in ("truncated.png", "zero.png", "bomb.png"):
        assert f"{folder / name}: {expected[name]}" in run.stderr
    assert "Traceback" not in run.stderr
    run = subprocess.run([sys.executable, "-m", "library.data.check", "--config", str(toml),
                          "--set", "dataset.bad_data=\"skip\""], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "  5 examples per epoch in 5 batches; gradient accumulation 1 -> 5 steps per epoch" in run.stdout
    for line in ("  1 image is a 16-bit PNG: converted to 8-bit RGB",
                 "  1 image is CMYK without an ICC profile: converted to RGB without color management",
                 "  1 image is a palette image with transparency: converted through RGBA"):
        assert line in run.stdout


def test_training_continues_past_bad_files_with_skip(make_config, tmp_path):
    from train_network import train

    folder, _ = _bad_folder(tmp_path)
    before = snapshot(folder)
    result = train(make_config(dataset={"train_data_dir": str(folder), "bad_data": "skip"},
                               train={"max_train_steps": 2}))
    assert len(result.losses) == 2 and all(0 < x < 3 for x in result.losses)
    assert snapshot(folder) == before
