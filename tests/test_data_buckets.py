"""Buckets, the batch sampler, crops and augmentations, with the exact bucket and crop of each file."""
import pytest
import torch
from PIL import Image

from data_files import caption, config, image
from library.data.buckets import BucketBatchSampler, BucketSettings, bucket_sizes, choose_bucket
from library.data.images import plan_crop
from library.data.plan import plan_data
from library.data.training_set import TrainingSet, collate

SMALL = BucketSettings((64, 64), True, 32, 128, 16, False)


def test_bucket_sizes_cover_the_area_of_the_resolution():
    assert bucket_sizes(SMALL) == [(32, 128), (48, 80), (64, 64), (80, 48), (96, 32), (112, 32), (128, 32)]
    assert bucket_sizes(BucketSettings((64, 64), False, 32, 128, 16, False)) == [(64, 64)]


@pytest.mark.parametrize("size, bucket", [
    ((64, 64), (64, 64)), ((96, 48), (80, 48)), ((48, 96), (48, 80)), ((300, 100), (96, 32)),
    ((100, 400), (32, 128)), ((1000, 10), (128, 32)),
])
def test_each_image_goes_to_the_bucket_nearest_its_aspect_ratio(size, bucket):
    assert choose_bucket(size, SMALL, bucket_sizes(SMALL)) == bucket


@pytest.mark.parametrize("size, bucket", [((40, 40), (32, 32)), ((100, 50), (80, 32)), ((200, 200), (64, 64)),
                                          ((500, 60), (128, 0))])  # 0: fits no bucket, a "too small" problem
def test_no_upscale_buckets_round_down(size, bucket):
    s = BucketSettings((64, 64), True, 32, 128, 16, True)
    assert choose_bucket(size, s, bucket_sizes(s)) == bucket


def test_a_batch_never_mixes_sizes_and_small_buckets_still_train():
    keys = [(0, (64, 64))] * 5 + [(0, (80, 48))] * 1 + [(0, (48, 80))] * 3
    sampler = BucketBatchSampler(keys, {k: 2 for k in keys}, torch.Generator().manual_seed(0))
    for epoch in (1, 2):
        batches = list(sampler)
        assert len(batches) == len(sampler) == 3 + 1 + 2
        assert all(len({keys[e] for e, _ in b}) == 1 and {ep for _, ep in b} == {epoch} for b in batches)
        assert sorted(e for b in batches for e, _ in b) == list(range(9))  # every entry once per epoch


def test_one_bucket_batches_exactly_as_a_shuffled_dataloader():
    reference = torch.utils.data.DataLoader(range(7), batch_size=3, shuffle=True,
                                            generator=torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(5)
    by_entry = {(e, epoch): e for e in range(7) for epoch in (1, 2)}  # a "dataset" keyed as ours is
    ours = torch.utils.data.DataLoader(by_entry, generator=generator, collate_fn=list,
                                       batch_sampler=BucketBatchSampler([0] * 7, {0: 3}, generator))
    assert [b.tolist() for _ in range(2) for b in reference] == [b for _ in range(2) for b in ours]


def _bucketed(tmp_path, **dataset):
    folder = tmp_path / "d"
    caption(image(folder / "wide.png", (96, 48)), "wide")
    caption(image(folder / "tall.png", (48, 96)), "tall")
    caption(image(folder / "square.png", (64, 64)), "square")
    cfg = config(tmp_path, train_data_dir=str(folder), enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128,
                 bucket_reso_steps=16, **dataset)
    return TrainingSet(plan_data(cfg), seed=1, prior_loss_weight=1.0)


def test_files_land_in_buckets_with_size_fields(tmp_path):
    ds = _bucketed(tmp_path)
    assert [(r.path.name, r.bucket) for r in ds.items] == [("square.png", (64, 64)), ("tall.png", (48, 80)),
                                                          ("wide.png", (80, 48))]
    wide = collate([ds[(2, 1)]])
    assert wide["pixels"].shape == (1, 3, 48, 80)
    assert wide["original_size"].tolist() == [[48, 96]] and wide["target_size"].tolist() == [[48, 80]]
    assert wide["crop_top_left"].tolist() == [[0, 8]]  # 96 wide, cropped to 80 around the center
    assert plan_crop((96, 48), (80, 48)).resized == (96, 48)


def test_flip_mirrors_pixels_and_the_crop(tmp_path):
    plain, flipped = _bucketed(tmp_path), _bucketed(tmp_path, flip_aug=True)
    flips = [flipped.__getitem__((2, e)) for e in (1, 2, 3, 4)]
    reference = plain[(2, 1)]["pixels"]
    drawn = [bool(torch.equal(f["pixels"], reference.flip(-1))) for f in flips]
    assert drawn == [False, True, True, False]  # seeded: the same on every run
    assert [f["crop_top_left"] for f in flips] == [(0, 8)] * 4  # centered crop: symmetric


def test_random_crop_is_seeded(tmp_path):
    ds = _bucketed(tmp_path, random_crop=True)
    assert [ds[(2, e)]["crop_top_left"] for e in (1, 2, 3)] == [(0, 12), (0, 1), (0, 2)]
    assert ds[(2, 1)]["crop_top_left"] == _bucketed(tmp_path, random_crop=True)[(2, 1)]["crop_top_left"]


def test_color_aug_shifts_hue_only_where_asked(tmp_path):
    plain, colored = _bucketed(tmp_path), _bucketed(tmp_path, color_aug=True)
    assert not torch.equal(plain[(0, 1)]["pixels"], colored[(0, 1)]["pixels"])
    assert torch.equal(colored[(0, 1)]["pixels"], colored[(0, 1)]["pixels"])


def test_alpha_mask_from_the_alpha_channel(tmp_path):
    im = Image.new("RGBA", (64, 64), (255, 0, 0, 255))
    im.paste((0, 0, 0, 0), (0, 0, 32, 64))  # left half transparent
    (tmp_path / "d").mkdir()
    im.save(tmp_path / "d" / "a.png")
    caption(image(tmp_path / "d" / "b.png"), "no alpha")
    caption(tmp_path / "d" / "a.png", "half")
    ds = TrainingSet(plan_data(config(tmp_path, train_data_dir=str(tmp_path / "d"), alpha_mask=True)), 1, 1.0)
    batch = collate([ds[(0, 1)], ds[(1, 1)]])
    mask = batch["mask"]
    assert mask.shape == (2, 1, 64, 64)
    assert mask[0, 0, :, :32].max() == 0 and mask[0, 0, :, 32:].min() == 1 and mask[1].min() == 1
    from library.data.training_set import latent_mask

    small = latent_mask(batch, torch.zeros(2, 4, 8, 8))
    assert small[0, 0, 0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_exif_rotated_image_trains_as_displayed(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    caption(image(tmp_path / "d" / "r.jpg", (96, 48), exif=exif.tobytes()), "rotated")
    notes = []
    plan = plan_data(config(tmp_path, train_data_dir=str(tmp_path / "d")), notes.append)
    assert plan.images[0].size == (48, 96)
    assert notes == [f"note: {tmp_path / 'd' / 'r.jpg'}: EXIF orientation 6: trained as displayed (48x96)"]
    assert TrainingSet(plan, 1, 1.0)[(0, 1)]["original_size"] == (96, 48)  # (h, w)
