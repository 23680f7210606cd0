"""FLUX.1 Kontext edit pairs on the tiny FLUX.1-dev-architecture model (Kontext-dev is FLUX.1-dev's transformer
trained with reference tokens): the reference latents enter the transformer as FluxKontextPipeline builds them,
a control image per training image (same stem in control_directory) reaches the loss, golden losses."""
import pytest
import torch
from PIL import Image

from conftest import control_images
from library.families.base import ModelSource
from library.families.flux import FluxFamily

# seed 7, dim 4, alpha 2, batch 2, lr 1e-3, 64px, transformer + CLIP-L adapters, T5 16 tokens, control images
GOLDEN_KONTEXT = [0.492586, 0.895321, 0.780357, 0.555235]


@pytest.fixture(scope="session")
def tiny_kontext(tmp_path_factory):
    from library.tiny import save_tiny_flux

    return save_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-kontext")


@pytest.fixture
def kontext_config(make_config, tiny_kontext, tiny_data):
    def make(control, **sections):
        model = {"pretrained_model_name_or_path": str(tiny_kontext["folder"]), "t5xxl_max_token_length": 16}
        return make_config(model=model, dataset={"control_directory": str(control)}, **sections)
    return make


def test_reference_tokens_are_flux_kontext_pipeline(tiny_kontext):
    """predict() with control latents = the transformer called on FluxKontextPipeline's packed latents and ids
    (reference tokens after the image's, first id 1), read from the image tokens."""
    from diffusers import FluxKontextPipeline

    family = FluxFamily()
    parts = family.load(ModelSource(str(tiny_kontext["folder"]), t5xxl_max_token_length=8))
    g = torch.Generator().manual_seed(0)
    latents, reference = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 16, 6, 10, generator=g)
    with torch.no_grad():
        text = family.encode_prompts(parts, ["a red dog"], 1)
        ours = family.predict(parts, latents, torch.tensor([500.0]), {**text, "control_latents": reference})
        plain = family.predict(parts, latents, torch.tensor([500.0]), text)
        ids = FluxKontextPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32)
        reference_ids = FluxKontextPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32)
        reference_ids[..., 0] = 1
        tokens = torch.cat([FluxKontextPipeline._pack_latents(latents, 1, 16, 8, 8),
                            FluxKontextPipeline._pack_latents(reference, 1, 16, 6, 10)], dim=1)
        out = parts.denoiser(hidden_states=tokens, encoder_hidden_states=text["prompt_embeds"],
                             pooled_projections=text["pooled_prompt_embeds"], timestep=torch.tensor([0.5]),
                             img_ids=torch.cat([ids, reference_ids]), txt_ids=torch.zeros(8, 3),
                             guidance=torch.tensor([3.5])).sample[:, :16]
    assert torch.allclose(ours, FluxKontextPipeline._unpack_latents(out, 64, 64, 8), atol=1e-6)
    assert not torch.allclose(ours, plain)


def test_edit_run_golden_losses_and_the_control_image_matters(kontext_config, tiny_data, tmp_path):
    from train_network import train

    result = train(kontext_config(control_images(tiny_data, tmp_path / "control-a", 1)))
    assert result.losses == pytest.approx(GOLDEN_KONTEXT, rel=1e-5)
    other = train(kontext_config(control_images(tiny_data, tmp_path / "control-b", 2, flat=True), save={"overwrite": True}))
    # the random tiny transformer mixes the reference tokens in weakly: other controls move each loss by ~2e-4,
    # 300x the run-to-run spread of the same pairs (below 1e-6 relative, checked next)
    assert all(abs(a - b) > 1e-4 for a, b in zip(result.losses, other.losses))
    again = train(kontext_config(tmp_path / "control-a", save={"overwrite": True}))
    assert again.losses == pytest.approx(result.losses, rel=1e-6)  # the same pairs: the same run


def test_cached_control_latents_follow_the_control_file(kontext_config, tiny_data, tmp_path, capsys):
    """cache_latents_to_disk stores each image's control latents beside its latents, with the control file in the
    dependency record: a changed control image makes the entry stale (re-encoded, other losses), an unchanged
    one is reused (the same losses)."""
    from train_network import train

    control = control_images(tiny_data, tmp_path / "control", 1)
    cached = {"cache_latents_to_disk": True, "cache_dir": str(tmp_path / "cache")}

    def run():
        cfg = kontext_config(control, save={"overwrite": True})
        for k, v in cached.items():
            setattr(cfg.dataset, k, v)
        capsys.readouterr()
        losses = train(cfg).losses
        return losses, next(line for line in capsys.readouterr().out.splitlines() if line.startswith("latents:"))

    from safetensors.torch import load_file

    def stored():
        return {p.name: load_file(p)["control_latents"] for p in (tmp_path / "cache" / "latents").iterdir()}

    first, said = run()
    assert "8 encoded" in said
    before = stored()
    assert len(before) == 8 and all(t.shape == (16, 8, 8) for t in before.values())
    again, said = run()
    assert "8 reused" in said and again == pytest.approx(first, rel=1e-6)
    control_images(tiny_data, control, 2, flat=True)  # new control images under the same names
    changed, said = run()
    assert "8 encoded (8 stale: control changed)" in said
    after = stored()
    assert before.keys() == after.keys() and not any(torch.allclose(before[k], after[k]) for k in before)
    assert changed != pytest.approx(first, rel=1e-5)  # the same pairs agree to 1e-6 (above)


def test_an_image_without_its_control_image_is_named_before_training(kontext_config, tiny_data, tmp_path):
    from library.data import DatasetError
    from library.data.plan import plan_data

    control = control_images(tiny_data, tmp_path / "control", 1)
    gone = sorted(control.iterdir())[0]
    gone.unlink()
    with pytest.raises(DatasetError, match=f"no control image {gone.stem}.\\* in {control} \\(control_directory\\)"):
        plan_data(kontext_config(control), say=lambda *_: None)


def test_samples_take_a_reference_image(tiny_kontext, tmp_path):
    """--ci in a prompt line: the sample is FluxKontextPipeline's with that reference, and differs from the plain
    sample and from the sample with another reference."""
    import numpy as np
    from diffusers import FluxKontextPipeline

    from library.prompts import parse_line

    refs = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        refs.append(tmp_path / f"ref{seed}.png")
        Image.fromarray((torch.rand(48, 80, 3, generator=g) * 255).to(torch.uint8).numpy()).save(refs[-1])
    prompt = parse_line(f"a red dog --w 64 --h 64 --s 2 --ci {refs[0]}", "prompts.txt:1")
    assert prompt.control_image == str(refs[0])
    family = FluxFamily()
    parts = family.load(ModelSource(str(tiny_kontext["folder"]), t5xxl_max_token_length=8))

    def sample(control):
        return np.asarray(family.sample(parts, "a red dog", 64, 64, 2, 5, "euler", 1, control_image=control))

    ours, other, plain = sample(prompt.control_image), sample(str(refs[1])), sample(None)
    pipe = FluxKontextPipeline.from_pretrained(str(tiny_kontext["folder"]))
    pipe.set_progress_bar_config(disable=True)
    reference = Image.open(refs[0]).convert("RGB").resize((64, 64), Image.LANCZOS)
    theirs = pipe(prompt="a red dog", image=reference, width=64, height=64, num_inference_steps=2, guidance_scale=3.5, max_sequence_length=8, _auto_resize=False,
                  generator=torch.Generator("cpu").manual_seed(5)).images[0]
    assert np.array_equal(ours, np.asarray(theirs))
    assert not np.array_equal(ours, other) and not np.array_equal(ours, plain)
    from library.prompts import PromptFileError

    with pytest.raises(PromptFileError, match="prompts.txt:2: control image .*missing.png not found"):
        parse_line(f"a dog --ci {tmp_path / 'missing.png'}", "prompts.txt:2")


def test_control_images_on_a_family_without_edit_training_are_one_config_error(tiny_sd1, tiny_data, tmp_path, capsys):
    """SD1 cannot read reference images: control_directory is refused before any model loads (exit 2, one line)."""
    import json

    import train_network

    control = control_images(tiny_data, tmp_path / "control", 1)
    config = tmp_path / "sd1.toml"
    config.write_text(f"[model]\npretrained_model_name_or_path = {json.dumps(str(tiny_sd1[0]))}\n"
                      f"[dataset]\ntrain_data_dir = {json.dumps(str(tiny_data))}\nresolution = 64\n"
                      f"control_directory = {json.dumps(str(control))}\n"
                      f"[train]\noutput_dir = {json.dumps(str(tmp_path / 'out'))}\n")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        train_network.main(["--config", str(config)])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert exit_.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"config error: {config}: 'dataset.control_directory': control (reference) images "
                               f"train edit models (FLUX.1 Kontext, FLUX.2, Qwen-Image-Edit); a sd1 model takes none")
    assert "Loading" not in captured.err + captured.out and not (tmp_path / "out" / "lora.safetensors").exists()
