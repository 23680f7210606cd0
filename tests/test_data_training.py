"""A training run on a bucketed dataset TOML with regularization images and alpha masks: what reaches the
loss (one size per batch, the latent-size mask, prior_loss_weight on regularization images)."""
import textwrap

from PIL import Image

from data_files import caption, image


def test_buckets_reg_and_alpha_mask_reach_the_loss(make_config, tmp_path, monkeypatch):
    import library.training
    from train_network import train

    seen = []
    original = library.training.denoising_loss

    def spy(family, parts, objective, latents, *args, mask=None, sample_weights=None, **kwargs):
        seen.append((tuple(latents.shape), None if mask is None else tuple(mask.shape), sample_weights.tolist()))
        return original(family, parts, objective, latents, *args, mask=mask, sample_weights=sample_weights, **kwargs)

    monkeypatch.setattr(library.training, "denoising_loss", spy)
    caption(image(tmp_path / "train" / "wide.png", (96, 48)), "a wide red thing")
    Image.new("RGBA", (48, 96), (0, 0, 255, 255)).save(tmp_path / "train" / "tall.png")
    caption(tmp_path / "train" / "tall.png", "a tall blue thing")
    image(tmp_path / "reg" / "r.png", (64, 64))
    toml = tmp_path / "d.toml"
    toml.write_text(textwrap.dedent(f"""
        [general]
        enable_bucket = true
        min_bucket_reso = 32
        max_bucket_reso = 128
        bucket_reso_steps = 16
        resolution = 64
        [[datasets]]
        batch_size = 2
          [[datasets.subsets]]
          image_dir = "{tmp_path / 'train'}"
          num_repeats = 2
          alpha_mask = true
          [[datasets.subsets]]
          image_dir = "{tmp_path / 'reg'}"
          class_tokens = "a thing"
          is_reg = true
    """))
    result = train(make_config(dataset={"dataset_config": str(toml), "prior_loss_weight": 0.5},
                               train={"max_train_steps": 4}))  # one epoch
    assert len(result.losses) == 4 and len(seen) == 4
    by_shape = {shape: (mask, weights) for shape, mask, weights in seen}
    assert by_shape == {(2, 4, 10, 6): ((2, 1, 10, 6), [1.0, 1.0]),  # tall: bucket 48x80
                        (2, 4, 6, 10): ((2, 1, 6, 10), [1.0, 1.0]),  # wide: bucket 80x48
                        (2, 4, 8, 8): (None, [0.5, 0.5])}  # regularization, balanced to 4 examples


def _masked_images(tmp_path):
    """Two 64x64 images and their masks: red = 4 x column (0..252), so the mask grows left to right."""
    import numpy as np

    for name in ("a", "b"):
        caption(image(tmp_path / "train" / f"{name}.png", (64, 64)), f"thing {name}")
    red = np.tile((np.arange(64) * 4).astype(np.uint8), (64, 1))
    pixels = np.stack([red, np.full_like(red, 200), np.full_like(red, 7)], axis=-1)  # green / blue: not read
    (tmp_path / "masks").mkdir()
    for name in ("a", "b"):
        Image.fromarray(pixels, "RGB").save(tmp_path / "masks" / f"{name}.png")
    return red.astype("float32") / 255.0


def test_masked_loss_reads_the_red_channel_of_mask_images(tmp_path):
    """sd-scripts' masked_loss with conditioning_data_dir: the mask image of the same stem, red channel / 255,
    cropped and flipped with its image; without masked_loss the folder is refused as sd-scripts refuses it."""
    import pytest
    import torch

    from data_files import config
    from library.config import ConfigError
    from library.data.plan import plan_data
    from library.data.training_set import TrainingSet, collate, latent_mask

    expected = torch.from_numpy(_masked_images(tmp_path))
    cfg = config(tmp_path, train_data_dir=str(tmp_path / "train"), masked_loss=True,
                 conditioning_data_dir=str(tmp_path / "masks"), flip_aug=True)
    ds = TrainingSet(plan_data(cfg, say=lambda _: None), 1, 1.0)
    masks = [ds[(entry, epoch)]["mask"][0] for entry in (0, 1) for epoch in range(1, 5)]
    assert all(torch.equal(m, expected) or torch.equal(m, expected.flip(-1)) for m in masks)
    assert any(torch.equal(m, expected.flip(-1)) for m in masks) and any(torch.equal(m, expected) for m in masks)
    small = latent_mask(collate([ds[(0, 1)]]), torch.zeros(1, 4, 8, 8))
    assert small.shape == (1, 1, 8, 8) and small[0, 0, 3].tolist() == pytest.approx(
        [(4 * (8 * k + 3.5)) / 255 for k in range(8)], abs=1e-6) or small[0, 0, 3].flip(-1).tolist() == pytest.approx(
        [(4 * (8 * k + 3.5)) / 255 for k in range(8)], abs=1e-6)  # the mean of each 8x8 block
    with pytest.raises(ConfigError, match="conditioning_data_dir.*set 'dataset.masked_loss' = true"):
        plan_data(config(tmp_path, train_data_dir=str(tmp_path / "train"),
                         conditioning_data_dir=str(tmp_path / "masks")), say=lambda _: None)


def test_masked_loss_reaches_the_loss_with_cached_latents(make_config, tmp_path, monkeypatch):
    import library.training
    import torch
    from train_network import train

    expected = torch.nn.functional.avg_pool2d(torch.from_numpy(_masked_images(tmp_path))[None, None], 8)[0]
    seen = []
    original = library.training.denoising_loss

    def spy(family, parts, objective, latents, *args, mask=None, **kwargs):
        seen.append(mask)
        return original(family, parts, objective, latents, *args, mask=mask, **kwargs)

    monkeypatch.setattr(library.training, "denoising_loss", spy)
    result = train(make_config(dataset={"train_data_dir": str(tmp_path / "train"), "masked_loss": True,
                                        "conditioning_data_dir": str(tmp_path / "masks"), "cache_latents": True},
                               train={"max_train_steps": 2}))
    assert len(result.losses) == 2 and len(seen) == 2
    assert all(m is not None and torch.allclose(m[0], expected, atol=1e-6) for m in seen)
