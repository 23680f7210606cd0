"""Valid but unusual images train: 16-bit PNGs, CMYK JPEGs (with and without an ICC profile), palette images with
transparency, greyscale and greyscale + alpha. Each passes the check, its pixels after loading equal an RGB
conversion computed here from the file's own values (not by the loader's code path), and the data summary
counts it in one line."""
import numpy as np
import pytest
from PIL import Image

from data_files import caption, cmyk_profile_k_only, config, lab_grey_to_srgb, png_16bit, snapshot
from library.data.images import load_pixels, plan_crop
from library.data.plan import plan_data

SIZE = 64
GRADIENT = np.linspace(0, 1, SIZE)[None, :].repeat(SIZE, 0)  # left to right, 0 .. 1


def _grey16(path):
    values = np.rint(GRADIENT * 65535).astype(np.uint16)
    values[0, :6] = [0, 128, 129, 257, 40000, 65535]  # round(v / 257): 0, 0, 1, 1, 156, 255
    Image.fromarray(values).save(path)  # mode I;16
    expected = np.rint(values / 257)
    return np.stack([expected] * 3, -1), None


def _rgb16(path):
    values = np.stack([GRADIENT * 65535, GRADIENT[:, ::-1] * 65535, np.full_like(GRADIENT, 65280)], -1)
    values = np.rint(values).astype(np.uint16)
    png_16bit(path, values)
    return values >> 8, None  # Pillow's PNG decoder keeps the high byte of 16-bit RGB


def _cmyk(path, icc=None):
    array = np.zeros((SIZE, SIZE, 4), np.uint8)
    array[..., 0], array[..., 1], array[..., 3] = 200, 50, np.rint(GRADIENT * 255)
    Image.fromarray(array, "CMYK").save(path, quality=95, **({"icc_profile": icc} if icc else {}))
    stored = np.asarray(Image.open(path)).astype(np.float64)  # the decoded CMYK values (JPEG is lossy)
    c, k = stored[..., :3], stored[..., 3:]
    if icc:  # the profile maps each pixel to the grey of L* = 100 (1 - K)
        grey = lab_grey_to_srgb(100 * (1 - k[..., 0] / 255))
        return np.stack([grey] * 3, -1), None
    return np.rint((255 - c) * (255 - k) / 255), None  # the plain formula: (1 - C)(1 - K)


def _palette_alpha(path):
    palette = [(10, 20, 30), (200, 100, 50), (0, 255, 0), (255, 255, 255)]
    indices = (np.arange(SIZE)[None, :].repeat(SIZE, 0) // 16).astype(np.uint8)
    im = Image.fromarray(indices, "P")
    im.putpalette([v for color in palette for v in color])
    im.save(path, transparency=0)  # index 0 is transparent
    expected = np.array(palette, np.float64)[indices]
    return expected, (indices != 0).astype(np.float64)


def _grey(path):
    values = np.rint(GRADIENT * 255).astype(np.uint8)
    Image.fromarray(values, "L").save(path)
    return np.stack([values] * 3, -1).astype(np.float64), None


def _grey_alpha(path):
    values = np.rint(GRADIENT * 255).astype(np.uint8)
    alpha = values[:, ::-1].copy()
    Image.fromarray(np.stack([values, alpha], -1), "LA").save(path)
    return np.stack([values] * 3, -1).astype(np.float64), alpha / 255.0


KINDS = {  # file name: (writer, the summary line)
    "grey16.png": (_grey16, "1 image is a 16-bit PNG: converted to 8-bit RGB"),
    "rgb16.png": (_rgb16, "1 image is a 16-bit PNG: converted to 8-bit RGB"),
    "cmyk.jpg": (_cmyk, "1 image is CMYK without an ICC profile: converted to RGB without color management"),
    "cmyk_icc.jpg": (lambda p: _cmyk(p, cmyk_profile_k_only()),
                     "1 image is CMYK with an ICC profile: converted to sRGB through their profile"),
    "palette.png": (_palette_alpha, "1 image is a palette image with transparency: converted through RGBA "
                                    "(transparent pixels keep their palette color; alpha_mask reads the transparency)"),
    "grey.png": (_grey, "1 image is greyscale: converted to RGB (R = G = B)"),
    "grey_alpha.png": (_grey_alpha, "1 image is greyscale: converted to RGB (R = G = B)"),
}


@pytest.mark.parametrize("name", KINDS)
def test_unusual_image_passes_the_check_and_loads_as_expected(tmp_path, name):
    write, line = KINDS[name]
    folder = tmp_path / "data"
    folder.mkdir()
    expected_rgb, expected_alpha = write(folder / name)
    caption(folder / name, "a picture")
    before = snapshot(folder)
    lines = []
    plan = plan_data(config(tmp_path, train_data_dir=str(folder), alpha_mask=True), lines.append)
    assert [r.path.name for r in plan.images] == [name] and not plan.skipped and not lines
    assert f"  {line}" in plan.summary(1)
    record = plan.images[0]
    pixels, mask = load_pixels(record.path, record.orientation, plan_crop(record.size, record.bucket),
                               with_mask=True)
    rgb = ((pixels.permute(1, 2, 0).numpy() + 1) * 127.5).round()
    # 16-bit, palette and greyscale conversions are exact; CMYK through the ICC profile goes through littlecms's
    # 16-bit Lab table interpolation and sRGB curve, within 2 of the closed form
    tolerance = 2 if name == "cmyk_icc.jpg" else 0
    assert np.abs(rgb - expected_rgb).max() <= tolerance
    if expected_alpha is None:
        assert mask.min() == 1
    else:
        assert np.allclose(mask[0].numpy(), expected_alpha, atol=1e-6)
    assert snapshot(folder) == before


def test_the_profile_matters_for_cmyk(tmp_path):
    """The same CMYK pixels with and without the K-only profile: the profile path gives grey, the plain one color."""
    with_icc, _ = _cmyk(tmp_path / "a.jpg", cmyk_profile_k_only())
    plain, _ = _cmyk(tmp_path / "b.jpg")
    crop = plan_crop((SIZE, SIZE), (SIZE, SIZE))
    loaded = {p: ((load_pixels(tmp_path / p, 1, crop)[0] + 1) * 127.5).round() for p in ("a.jpg", "b.jpg")}
    assert (loaded["a.jpg"][0] == loaded["a.jpg"][2]).all()  # R = B: grey
    assert (loaded["b.jpg"][0] - loaded["b.jpg"][2]).abs().max() > 100  # C = 200 takes red away
    assert np.abs(with_icc - plain).max() > 100


def test_summary_counts_each_kind_once(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("grey16.png", "rgb16.png", "grey.png", "grey_alpha.png", "cmyk.jpg"):
        KINDS[name][0](folder / name)
        caption(folder / name, "x")
    summary = plan_data(config(tmp_path, train_data_dir=str(folder)), lambda line: None).summary(1)
    notes = [line for line in summary if " converted " in line]
    assert notes == ["  2 images are 16-bit PNGs: converted to 8-bit RGB",
                     "  1 image is CMYK without an ICC profile: converted to RGB without color management",
                     "  2 images are greyscale: converted to RGB (R = G = B)"]


def test_every_kind_trains(make_config, tmp_path, capsys):
    from train_network import train

    folder = tmp_path / "data"
    folder.mkdir()
    for name, (write, _) in KINDS.items():
        write(folder / name)
        caption(folder / name, "a red dog")
    result = train(make_config(dataset={"train_data_dir": str(folder), "alpha_mask": True, "num_repeats": 1},
                               train={"max_train_steps": 4}))
    assert len(result.losses) == 4 and all(0 < x < 3 for x in result.losses)
    out = capsys.readouterr().out
    for line in ("  2 images are 16-bit PNGs: converted to 8-bit RGB",
                 "  1 image is CMYK with an ICC profile: converted to sRGB through their profile",
                 "  1 image is CMYK without an ICC profile: converted to RGB without color management",
                 "  1 image is a palette image with transparency: converted through RGBA",
                 "  2 images are greyscale: converted to RGB (R = G = B)"):
        assert line in out
