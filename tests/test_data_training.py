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
