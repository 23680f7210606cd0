"""Sample images during training: prompt files checked at start, reproducible seeded samples, and the
training unchanged by sampling."""
import json

import pytest
from PIL import Image, ImageChops

from goldens import GOLDEN_SD1
from library.config import ConfigError
from library.prompts import PromptFileError, SamplePrompt, parse_line, read_prompt_file
from train_network import train


def test_prompt_line_flags():
    p = parse_line("a dog, sitting --n blurry, low quality --w 768 --h 512 --d 42 --s 30 --l 6.5 --g 3.5 --ss euler_a",
                   "x.txt:1")
    assert p == SamplePrompt("a dog, sitting", "blurry, low quality", 768, 512, 42, 30, 6.5, 3.5, "euler_a")
    assert parse_line("just a prompt", "x") == SamplePrompt("just a prompt")


@pytest.mark.parametrize("line, message", [
    ("a dog --x 3", "x.txt:4: unknown flag --x"),
    ("a dog --w big", "x.txt:4: --w: 'big' is not an integer"),
    ("a dog --l high", "x.txt:4: --l: 'high' is not a number"),
    ("a dog --w 500", "width 500 must be a positive multiple of 8"),
    ("a dog --ss fancy", "sampler 'fancy' is not one of"),
    ("--n only negative", "empty prompt"),
])
def test_bad_prompt_lines_name_file_and_line(line, message):
    with pytest.raises(PromptFileError, match=message):
        parse_line(line, "x.txt:4")


def test_toml_and_json_prompt_files(tmp_path):
    toml_file = tmp_path / "p.toml"
    toml_file.write_text('[prompt]\nwidth = 64\nsample_steps = 3\n[[prompt.subset]]\nprompt = "a cat"\nseed = 5\n'
                         '[[prompt.subset]]\nprompt = "a dog"\nnegative_prompt = "ugly"\nscale = 4\n')
    assert read_prompt_file(toml_file) == [SamplePrompt("a cat", width=64, steps=3, seed=5),
                                           SamplePrompt("a dog", "ugly", width=64, steps=3, scale=4.0)]
    json_file = tmp_path / "p.json"
    json_file.write_text(json.dumps(["a cat --d 1", {"prompt": "a dog", "height": 128}]))
    assert read_prompt_file(json_file) == [SamplePrompt("a cat", seed=1), SamplePrompt("a dog", height=128)]
    json_file.write_text(json.dumps([{"prompt": "a dog", "colour": "red"}]))
    with pytest.raises(PromptFileError, match=r"entry 1: unknown key\(s\) \['colour'\]"):
        read_prompt_file(json_file)


def test_bad_prompt_file_is_a_config_error_at_start(make_config, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n# fine\na blue square --s many\n")
    with pytest.raises(ConfigError, match=r"prompts.txt:3: --s: 'many' is not an integer"):
        make_config(sample={"sample_prompts": str(prompts)})


def test_samples_are_reproducible_and_do_not_change_training(make_config, tmp_path):
    run = train

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --d 9 --s 3\na blue square --w 32 --h 48 --s 2 --ss euler\n")
    sections = dict(sample={"sample_prompts": str(prompts), "sample_every_n_steps": 2, "sample_at_first": True,
                            "sample_every_n_epochs": 1})
    first = run(make_config(**sections, logging={"log_with": "tensorboard"}))
    assert first.losses == pytest.approx(GOLDEN_SD1, rel=1e-5)  # same losses as the run without sampling
    names = [p.name for p in first.samples]
    assert names == ["lora_step00000000_00_9.png", "lora_step00000000_01_1235.png", "lora_step00000000_grid.png",
                     "lora_step00000002_00_9.png", "lora_step00000002_01_1235.png", "lora_step00000002_grid.png",
                     "lora_step00000004_00_9.png", "lora_step00000004_01_1235.png", "lora_step00000004_grid.png"]
    assert Image.open(first.samples[1]).size == (32, 48) and Image.open(first.samples[2]).size == (128, 64)
    second = run(make_config(**sections, train={"output_name": "again"}))
    for a, b in zip(first.samples, second.samples):
        assert ImageChops.difference(Image.open(a), Image.open(b)).getbbox() is None, a.name
    assert ImageChops.difference(Image.open(first.samples[0]), Image.open(first.samples[6])).getbbox() is not None
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "out" / "logs" / "lora").glob("events.*"))),
                              size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("samples/01")] == [0, 2, 4]
    assert (events.Images("samples/01")[0].width, events.Images("samples/01")[0].height) == (32, 48)


def test_sample_tiled_vae_decodes_in_overlapping_tiles_and_restores_the_vae():
    """sample_tiled_vae: a 512 px sample decodes in 256 px tiles (32 latents, stride 24: 3 x 3 decoder calls),
    the image blended from them; afterwards the VAE decodes whole again, as before."""
    import torch
    from diffusers import AutoencoderKL

    from library.sampling import vae_tile, vae_tiles

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=32, sample_size=64).eval()
    latents = torch.randn(1, 4, 64, 64)
    calls = []
    vae.decoder.register_forward_pre_hook(lambda module, args: calls.append(tuple(args[0].shape[-2:])))
    with torch.no_grad():
        whole = vae.decode(latents).sample
        with vae_tiles(vae, 512, tiled=True):
            tiled = vae.decode(latents).sample
        again = vae.decode(latents).sample
    tiles = [vae_tile(512, True), vae_tile(1024, True), vae_tile(1024, False), vae_tile(1328, False)]
    assert tiles == [256, 512, 0, -1]
    assert calls == [(64, 64), (32, 32), (32, 32), (32, 16), (32, 32), (32, 32), (32, 16), (16, 32), (16, 32),
                     (16, 16), (64, 64)]
    assert tiled.shape == whole.shape and not torch.equal(tiled, whole)
    assert torch.equal(again, whole) and (vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size) == (
        False, 64, 8)
