"""Layouts: the sd-scripts dataset TOML (levels overriding each other), the folder convention with
reg_data_dir, regularization balance, the steps-per-epoch arithmetic, and layout errors (ConfigError)."""
import textwrap

import pytest

from data_files import caption, config, image
from library.config import ConfigError
from library.data.plan import plan_data


def _toml(tmp_path, text):
    path = tmp_path / "dataset.toml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_folder_convention_with_reg_data_dir(tmp_path):
    train, reg = tmp_path / "train", tmp_path / "reg"
    caption(image(train / "top.png"), "top level")
    image(train / "3_sks dog" / "a.png")
    caption(image(train / "3_sks dog" / "b.png"), "b caption")
    image(train / "not_numbered" / "c.png")
    image(reg / "1_dog" / "r.png")
    notes = []
    plan = plan_data(config(tmp_path, train_data_dir=str(train), reg_data_dir=str(reg), num_repeats=2), notes.append)
    assert [(r.path.name, r.caption, r.subset.num_repeats, r.subset.is_reg) for r in plan.images] == [
        ("top.png", "top level", 2, False), ("a.png", "sks dog", 3, False), ("b.png", "b caption", 3, False),
        ("r.png", "dog", 1, True)]
    assert notes == [f"note: skipped folder {train / 'not_numbered'}: its name does not start with 'N_' "
                     f"(N = repeats), e.g. '10_not_numbered'"]
    # 2 + 3 + 3 = 8 training examples, and the one regularization image repeated to balance them
    assert plan.entries == [0, 0, 1, 1, 1, 2, 2, 2] + [3] * 8


def test_regularization_balance_uses_the_first_ones_when_there_are_more(tmp_path):
    train, reg = tmp_path / "train", tmp_path / "reg"
    caption(image(train / "1_x" / "a.png"), "a")
    for name in "pqrs":
        image(reg / "2_dog" / f"{name}.png")
    plan = plan_data(config(tmp_path, train_data_dir=str(train), reg_data_dir=str(reg)))
    assert [plan.images[i].path.name for i in plan.entries] == ["a.png", "p.png"]


def test_dataset_toml_levels_override_each_other(tmp_path):
    for name in ("one", "two", "three"):
        caption(image(tmp_path / name / "x.png"), f"{name} caption")
    path = _toml(tmp_path, f"""
        [general]
        shuffle_caption = true
        caption_extension = ".txt"
        keep_tokens = 1
        [[datasets]]
        resolution = [64, 32]
        batch_size = 4
          [[datasets.subsets]]
          image_dir = "{tmp_path / 'one'}"
          num_repeats = 5
          keep_tokens = 2
          [[datasets.subsets]]
          image_dir = "{tmp_path / 'two'}"
          is_reg = true
          class_tokens = "dog"
        [[datasets]]
        resolution = "48,48"
        shuffle_caption = false
          [[datasets.subsets]]
          image_dir = "{tmp_path / 'three'}"
          flip_aug = true
    """)
    plan = plan_data(config(tmp_path, dataset_config=path, train_batch_size=3))
    (d0, d1) = plan.layout.datasets
    assert (d0.buckets.resolution, d0.batch_size, d1.buckets.resolution, d1.batch_size) == ((64, 32), 4, (48, 48), 3)
    one, two = d0.subsets
    (three,) = d1.subsets
    assert (one.num_repeats, one.captions.keep_tokens, one.captions.shuffle_caption) == (5, 2, True)
    assert (two.num_repeats, two.is_reg, two.class_tokens, two.captions.keep_tokens) == (1, True, "dog", 1)
    assert (three.captions.shuffle_caption, three.augment.flip_aug, one.augment.flip_aug) == (False, True, False)
    assert [r.bucket for r in plan.images] == [(64, 32), (64, 32), (48, 48)]
    assert plan.batches_per_epoch() == 2 + 1 + 1  # 5 + 5 balanced reg in batches of 4; 1 in dataset 1


def test_steps_per_epoch_arithmetic_is_printed(tmp_path):
    for i in range(5):
        caption(image(tmp_path / "d" / f"{i}.png"), "x")
    lines = []
    cfg = config(tmp_path, train_data_dir=str(tmp_path / "d"), num_repeats=3, train_batch_size=2)
    plan = plan_data(cfg, lines.append)
    assert plan.summary(accumulation=3)[-1] == (
        "  15 examples per epoch in 8 batches; gradient accumulation 3 -> 3 steps per epoch")
    assert f"  {tmp_path / 'd'}: 5 training images x 3 repeats -> 15 examples per epoch" in plan.summary(1)


@pytest.mark.parametrize("body, message", [
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{d}"\nnum_repets = 2\n',
     "datasets[0].subsets[0]: key 'num_repets' is not supported here (did you mean 'num_repeats'?)"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{d}"\nflip_aug = "yes"\n',
     "'datasets[0].subsets[0].flip_aug' must be true/false, got str 'yes'"),
    ('[[datasets]]\nbatch_size = 2\n[[datasets.subsets]]\nimage_dir = "{d}/nope"\n',
     "'datasets[0].subsets[0].image_dir': no such folder"),
    ('[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 1\n', "'datasets[0].subsets[0].image_dir' is required"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{d}"\nmetadata_file = "{d}/m.json"\n',
     "'datasets[0].subsets[0].metadata_file': "),  # fine-tune metadata that is not there: cannot read
    ('[[datasets]]\nenable_bucket = true\nmin_bucket_reso = 100\n[[datasets.subsets]]\nimage_dir = "{d}"\n',
     "must be multiples of bucket_reso_steps (64)"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{d}"\ncaption_dropout_rate = 1.5\n',
     "'datasets[0].subsets[0].caption_dropout_rate' must be between 0 and 1"),
    ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{d}"\nrandom_crop = true\n',
     "'random_crop' (in datasets[0].subsets[0]) changes the pixels every epoch, so latents cannot be cached"),
])
def test_dataset_toml_errors_name_the_file_and_key(tmp_path, body, message):
    image(tmp_path / "d" / "x.png")
    path = _toml(tmp_path, body.format(d=tmp_path / "d"))
    with pytest.raises(ConfigError) as e:
        plan_data(config(tmp_path, dataset_config=path, cache_latents=True))
    assert message in str(e.value) and path in str(e.value)


def test_text_encoder_cache_refuses_changing_captions(tmp_path):
    caption(image(tmp_path / "d" / "x.png"), "a, b")
    cfg = config(tmp_path, train_data_dir=str(tmp_path / "d"), shuffle_caption=True)
    cfg.train.cache_text_encoder_outputs = True
    with pytest.raises(ConfigError, match="text-encoder outputs cannot be cached"):
        plan_data(cfg)


def test_training_config_needs_a_data_source(tmp_path):
    with pytest.raises(ConfigError, match="'dataset.train_data_dir' or 'dataset.dataset_config' is required"):
        config(tmp_path)


def test_cli_dataset_config_flag_and_exit_codes(tmp_path, tiny_sd1):
    import subprocess
    import sys

    from conftest import ROOT

    train = tmp_path / "train"
    image(train / "1_x" / "empty.png").write_bytes(b"")
    (tmp_path / "t.toml").write_text(textwrap.dedent(f"""
        [model]
        pretrained_model_name_or_path = "{tiny_sd1[0]}"
        [train]
        output_dir = "{tmp_path / 'out'}"
    """))
    toml = _toml(tmp_path, f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{train / "1_x"}"\n')
    run = subprocess.run([sys.executable, str(ROOT / "train_network.py"), "--config", str(tmp_path / "t.toml"),
                          "--dataset_config", toml], capture_output=True, text=True, timeout=120)
    assert run.returncode == 3, run.stderr[-2000:]
    assert f"dataset error: 1 problem(s)" in run.stderr and f"{train / '1_x' / 'empty.png'}: empty file (0 bytes)" \
        in run.stderr
    assert "precision:" not in run.stdout  # stopped before any model loaded
