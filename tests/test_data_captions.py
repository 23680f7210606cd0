"""Captions: reading caption files (class tokens, .caption, problems) and the seeded transforms, with the
exact caption each seed yields."""
import random

import pytest

from data_files import caption, config, image
from library.data.augment import example_rng
from library.data.captions import CaptionRecipe, read_caption, render_caption
from library.data.plan import plan_data
from library.data.training_set import TrainingSet

TAGS = "sks, dog, red collar, grass, sunny"
PLAIN = dict(shuffle_caption=False, keep_tokens=0, keep_tokens_separator="", caption_separator=",",
             caption_prefix=None, caption_suffix=None, caption_dropout_rate=0.0, caption_tag_dropout_rate=0.0,
             caption_dropout_every_n_epochs=0)


def recipe(**changes):
    return CaptionRecipe(**(PLAIN | changes))


def draw(seed=7, epoch=1, entry=0):
    return example_rng(seed, epoch, entry, "caption")


def test_plain_caption_is_used_exactly_as_written():
    assert render_caption("a photo  of a,b", recipe(), draw(), 1) == "a photo  of a,b"


def test_shuffle_keeps_the_first_keep_tokens_and_is_seeded():
    r = recipe(shuffle_caption=True, keep_tokens=2)
    assert render_caption(TAGS, r, draw(epoch=1), 1) == "sks, dog, grass, red collar, sunny"
    assert render_caption(TAGS, r, draw(epoch=1), 1) == "sks, dog, grass, red collar, sunny"  # same seed
    assert render_caption(TAGS, r, draw(epoch=2), 2) == "sks, dog, sunny, red collar, grass"  # next epoch


def test_keep_tokens_separator_fixes_the_front_and_the_back():
    text = "sks dog ||| red collar, grass, sunny ||| best quality"
    assert render_caption(text, recipe(shuffle_caption=True, keep_tokens_separator="|||"), draw(), 1) == (
        "sks dog, grass, red collar, sunny, best quality")
    assert render_caption(text, recipe(keep_tokens_separator="|||"), draw(), 1) == (
        "sks dog, red collar, grass, sunny, best quality")  # the marks are removed even without shuffling


def test_other_caption_separator():
    assert render_caption("a; b; c; d", recipe(caption_separator=";", shuffle_caption=True),
                          example_rng(1, 1, 0, "caption"), 1) == "b; a; c; d"


def test_tag_dropout_and_caption_dropout_are_seeded():
    assert render_caption(TAGS, recipe(caption_tag_dropout_rate=0.5), draw(), 1) == "sks, dog, grass"
    dropped = [render_caption(TAGS, recipe(caption_dropout_rate=0.5), draw(entry=e), 1) for e in range(4)]
    assert dropped == [TAGS, "", TAGS, TAGS]


def test_prefix_suffix_and_dropout_every_n_epochs():
    r = recipe(caption_prefix="photo, ", caption_suffix="hd", caption_dropout_every_n_epochs=2)
    assert render_caption(TAGS, r, random.Random(0), 1) == "photo, sks, dog, red collar, grass, sunny, hd"
    assert render_caption(TAGS, r, random.Random(0), 2) == ""  # epochs 2, 4, ... train unconditioned


@pytest.mark.parametrize("content, class_tokens, expected", [
    (None, "sks dog", ("sks dog", None)),
    ("  a caption \n", "sks dog", ("a caption", None)),
    ("\ufeffwith a BOM", None, ("with a BOM", None)),
    (None, None, (None, "no caption file x.txt and no class tokens (from a folder name or class_tokens)")),
    ("  \n", None, (None, "caption file x.txt is empty")),
    (b"caf\xe9", None, (None, "caption file x.txt is not UTF-8 (byte 0xe9 at offset 3)")),
    ("sks, café, 猫".encode("utf-16"), None, ("sks, café, 猫", None)),  # with its BOM (Windows Notepad "Unicode")
    (b"\xfe\xff" + "sks dog".encode("utf-16-be"), None, ("sks dog", None)),
    ("sks, café, 猫 \n".encode("utf-16-le"), None, ("sks, café, 猫", None)),  # no BOM: found from the NUL bytes
    ("sks dog".encode("utf-16-be"), None, ("sks dog", None)),
    (b"sks\x00dog", None, (None, "caption file x.txt holds NUL bytes (offset 3): not UTF-8 text (UTF-16 or another "
                                 "encoding? save it as UTF-8)")),
])
def test_read_caption(tmp_path, content, class_tokens, expected):
    path = image(tmp_path / "x.png")
    if content is not None:
        caption(path, content)
    assert read_caption(path, ".txt", class_tokens) == expected


def test_caption_extension_and_seeded_examples_through_the_dataset(tmp_path):
    caption(image(tmp_path / "d" / "x.png"), "ignored, because, txt", ".txt")
    caption(image(tmp_path / "d" / "x.png"), TAGS, ".caption")
    cfg = config(tmp_path, train_data_dir=str(tmp_path / "d"), caption_extension=".caption", shuffle_caption=True,
                 keep_tokens=1, num_repeats=2)
    first = TrainingSet(plan_data(cfg), seed=3, prior_loss_weight=1.0)
    again = TrainingSet(plan_data(cfg), seed=3, prior_loss_weight=1.0)
    keys = [(0, 1), (1, 1), (0, 2)]
    captions = [first[k]["caption"] for k in keys]
    assert captions == [again[k]["caption"] for k in keys]
    assert captions == ["sks, red collar, sunny, dog, grass", "sks, red collar, sunny, grass, dog",
                        "sks, red collar, sunny, grass, dog"]


def _metadata_images(tmp_path):
    """Three images with caption files that fine-tune metadata overrides, and the metadata: a stem key, a
    relative path, an absolute path."""
    import json

    folder = tmp_path / "d"
    for name in ("a.png", "b.png", "c.jpg"):
        caption(image(folder / name), "from the caption file")
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"a": {"caption": "a red dog", "tags": "dog, red"}, "b.png": {"tags": "cat"},
                                str(folder / "c.jpg"): {"caption": "a bird", "tags": ""}}))
    return folder, meta


def test_fine_tune_metadata_file_captions_a_dataset_toml(tmp_path):
    """sd-scripts' metadata_file: the caption, caption_separator and the tags of each image key (stem, relative or
    absolute), never the caption files; num_repeats as for any subset."""
    folder, meta = _metadata_images(tmp_path)
    toml = tmp_path / "dataset.toml"
    toml.write_text(f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "{folder}"\n'
                    f'metadata_file = "{meta}"\nnum_repeats = 3\ncaption_separator = ", "\n')
    plan = plan_data(config(tmp_path, dataset_config=str(toml)), say=lambda _: None)
    assert {r.path.name: r.caption for r in plan.images} == {"a.png": "a red dog, dog, red", "b.png": "cat",
                                                              "c.jpg": "a bird"}
    assert len(plan.entries) == 9


def test_in_json_with_train_data_dir_as_sd_scripts_fine_tune(tmp_path):
    """A flat sd-scripts config: train_data_dir + in_json, dataset_repeats its repeats; the default separator is
    sd-scripts' "," with no space."""
    from library.config_files import config_from_dict

    folder, meta = _metadata_images(tmp_path)
    flat = {"pretrained_model_name_or_path": "tiny/model", "output_dir": str(tmp_path / "out"), "resolution": 64,
            "train_data_dir": str(folder), "in_json": str(meta), "dataset_repeats": 2}
    plan = plan_data(config_from_dict(flat, source="x.toml", check_paths=False), say=lambda _: None)
    assert {r.path.name: r.caption for r in plan.images} == {"a.png": "a red dog,dog, red", "b.png": "cat",
                                                              "c.jpg": "a bird"}
    assert len(plan.entries) == 6


def test_metadata_naming_a_missing_image_or_unreadable_stops_with_the_file(tmp_path):
    import json

    from library.config import ConfigError
    from library.data.plan import DatasetError

    folder, meta = _metadata_images(tmp_path)
    meta.write_text(json.dumps({"a": {"caption": "x"}, "gone": {"caption": "y"}}))
    with pytest.raises(DatasetError, match="gone.*no such image"):
        plan_data(config(tmp_path, train_data_dir=str(folder), in_json=str(meta), bad_data="stop"),
                  say=lambda _: None)
    meta.write_text("{not json")
    with pytest.raises(ConfigError, match="in_json.*not valid metadata JSON"):
        plan_data(config(tmp_path, train_data_dir=str(folder), in_json=str(meta)), say=lambda _: None)


def test_token_warmup_as_sd_scripts_cuts_captions():
    """floor(step * (movable - token_warmup_min) / token_warmup_step) + token_warmup_min movable tags before
    token_warmup_step (a fraction: of max_train_steps), kept tags always, every tag after."""
    r = recipe(keep_tokens=1, token_warmup_min=1, token_warmup_step=10)
    text = "sks, a, b, c, d, e"
    got = [render_caption(text, r, random.Random(0), 1, step, 100) for step in (0, 5, 9, 10, 50)]
    assert got == ["sks, a", "sks, a, b, c", "sks, a, b, c, d", text, text]  # 1, 3 (=5*4/10+1), 4, all, all
    half = recipe(keep_tokens=1, token_warmup_min=1, token_warmup_step=0.5)  # of max_train_steps 20: 10 steps
    assert render_caption(text, half, random.Random(0), 1, 5, 20) == "sks, a, b, c"
    assert not half.is_fixed and render_caption(text, recipe(), random.Random(0), 1, 0, 20) == text


def test_token_warmup_follows_the_optimizer_step_through_the_loader(tmp_path):
    from library.training import make_loader, prepare_data

    caption(image(tmp_path / "d" / "x.png"), "sks, a, b, c, d, e")
    cfg = config(tmp_path, train_data_dir=str(tmp_path / "d"), num_repeats=6, keep_tokens=1, token_warmup_min=1,
                 token_warmup_step=4)
    cfg.train.max_train_steps, cfg.train.seed = 6, 1
    plan, dataset, _, _, _ = prepare_data(cfg, lambda _: None)
    loader, _, _ = make_loader(cfg, plan, dataset)
    captions = [batch["caption"][0] for batch in loader]
    assert captions == ["sks, a", "sks, a, b", "sks, a, b, c", "sks, a, b, c, d", "sks, a, b, c, d, e",
                        "sks, a, b, c, d, e"]
