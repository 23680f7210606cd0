"""FLUX.1 on the tiny FLUX-architecture model: the shipped architectures, loading (folder, and the BFL
transformer file with separate clip_l / t5xxl / ae files), the BFL layout both ways, the text conditioning
against diffusers' FluxPipeline, golden losses of adapter and full fine-tune runs, the adapter in diffusers."""
import pytest
import torch
from safetensors.torch import load_file

from conftest import (FULL_FINE_TUNE, close, lora_layers, peft_adapter_in_pipeline, pipeline_parts, predict_caption,
                      split_files_source, train_db, train_network)
from goldens import GOLDEN_FLUX, GOLDEN_FLUX_DB
from library.families import get_family
from library.families.base import ModelSource
from library.families.flux import FluxFamily, latent_image_ids, pack_latents, unpack_latents
from library.loading import CheckpointError, arch_dir
from model_checks import assert_same_weights


def _single_file_source(files, **extra):
    return split_files_source(files, "clip_l", "t5xxl", "ae", **extra)


def test_shipped_flux_configs_build_the_real_architecture():
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    with torch.device("meta"):
        dev = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(str(arch_dir("flux-dev") / "transformer")))
        schnell = FluxTransformer2DModel.from_config(
            FluxTransformer2DModel.load_config(str(arch_dir("flux-schnell") / "transformer")))
        t5 = T5EncoderModel(T5Config.from_pretrained(str(arch_dir("flux-dev") / "text_encoder_2")))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(arch_dir("flux-dev") / "vae")))
    assert count(dev) == 11_901_408_320 and count(schnell) == 11_891_178_560
    assert count(t5) == 4_762_310_656 and count(vae) == 83_819_683


def test_bfl_layout_is_the_inverse_of_diffusers_converter():
    """Ours -> BFL -> diffusers' own converter gives back the same keys and shapes (full width, meta device)."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    from library.flux_layout import bfl_module_name, bfl_to_transformer, transformer_to_bfl

    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True)
    state = model.state_dict()
    bfl = transformer_to_bfl(state)
    assert "double_blocks.0.img_attn.qkv.weight" in bfl and "single_blocks.0.linear1.weight" in bfl
    theirs = convert_flux_transformer_checkpoint_to_diffusers({"model.diffusion_model." + k: v for k, v in bfl.items()})
    ours = bfl_to_transformer(bfl)
    assert set(theirs) == set(state) == set(ours)
    assert all(theirs[k].shape == state[k].shape == ours[k].shape for k in state)
    assert bfl_module_name("transformer_blocks.0.attn.to_k") == "double_blocks.0.img_attn.qkv"
    assert bfl_module_name("transformer_blocks.3.attn.add_v_proj") == "double_blocks.3.txt_attn.qkv"
    assert bfl_module_name("transformer_blocks.0.ff_context.net.2") == "double_blocks.0.txt_mlp.2"
    assert bfl_module_name("single_transformer_blocks.5.proj_mlp") == "single_blocks.5.linear1"
    assert bfl_module_name("single_transformer_blocks.5.norm.linear") == "single_blocks.5.modulation.lin"


def test_single_files_and_folder_give_identical_weights(tiny_flux):
    assert get_family("auto", str(tiny_flux["folder"])).name == "flux"
    assert get_family("auto", str(tiny_flux["transformer"])).name == "flux"
    family = FluxFamily()
    a = family.load(ModelSource(str(tiny_flux["folder"])))
    b = family.load(_single_file_source(tiny_flux))
    assert_same_weights(a, b)
    with pytest.raises(CheckpointError, match="model.clip_l, model.t5xxl, model.ae"):
        family.load(ModelSource(str(tiny_flux["transformer"])))


def test_sd1_files_stay_with_sd1(tiny_sd1):
    assert not FluxFamily().claims(str(tiny_sd1[0])) and not FluxFamily().claims(str(tiny_sd1[1]))


def test_text_conditioning_and_packing_are_diffusers_pipeline(tiny_flux):
    from diffusers import FluxPipeline

    family = FluxFamily()
    parts = family.load(ModelSource(str(tiny_flux["folder"]), t5xxl_max_token_length=32))
    captions = ["a photo of a red circle", "blue"]
    with torch.no_grad():
        ours = family.encode_prompts(parts, captions, 1)
        embeds, pooled, text_ids = family.pipeline(parts).encode_prompt(captions, None, device="cpu",
                                                                        max_sequence_length=32)
    assert ours["prompt_embeds"].shape == (2, 32, 48) and torch.allclose(ours["prompt_embeds"], embeds, atol=1e-4)
    assert torch.equal(ours["pooled_prompt_embeds"], pooled)
    latents = torch.randn(2, 16, 8, 12)
    assert torch.equal(pack_latents(latents), FluxPipeline._pack_latents(latents, 2, 16, 8, 12))
    assert torch.equal(unpack_latents(pack_latents(latents), 8, 12), latents)
    assert torch.equal(latent_image_ids(8, 12, "cpu"), FluxPipeline._prepare_latent_image_ids(2, 4, 6, "cpu",
                                                                                               torch.float32))


def test_t5_attention_mask_zeroes_padding(tiny_flux):
    family = FluxFamily()
    parts = family.load(ModelSource(str(tiny_flux["folder"]), t5xxl_max_token_length=16, apply_t5_attn_mask=True))
    with torch.no_grad():
        out = family.encode_prompts(parts, ["blue"], 1)["prompt_embeds"]
    n = len(parts.tokenizers["te3"]("blue").input_ids)
    assert out[0, n:].abs().max() == 0 and out[0, :n].abs().max() > 0


def test_guidance_reaches_the_transformer(tiny_flux):
    family = FluxFamily()
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    outs = []
    for g in (1.0, 3.5):
        parts = family.load(ModelSource(str(tiny_flux["folder"]), guidance_scale=g, t5xxl_max_token_length=8))
        with torch.no_grad():
            text = family.encode_prompts(parts, ["a red dog"], 1)
            outs.append(family.predict(parts, latents, torch.tensor([500.0]), text))
    assert not torch.allclose(*outs)


# ---- training -----------------------------------------------------------------------------------


def test_golden_losses_lora(flux_config):
    result = train_network(flux_config())
    assert close(result.losses, GOLDEN_FLUX)
    assert {c.target.kohya_prefix for c in result.adapted} == {"lora_unet", "lora_te1"}
    names = {k.split(".", 1)[0] for k in load_file(result.adapter_path)}
    assert "lora_unet_double_blocks_0_img_attn_qkv" in names and "lora_unet_single_blocks_1_linear1" in names
    assert "lora_te1_text_model_encoder_layers_1_mlp_fc2" in names


def test_t5_cached_while_clip_l_trains_gives_the_golden_losses(flux_config, tmp_path):
    """sd-scripts' partial text-encoder cache: cache_text_encoder_outputs with a trained CLIP-L adapter caches T5
    only; CLIP-L runs (and trains) every step. Same losses and adapter as encoding everything each step; on
    disk, only T5's outputs, read back by a second run."""
    cache = tmp_path / "cache"
    cfg = flux_config(train={"cache_text_encoder_outputs_to_disk": True}, dataset={"cache_dir": str(cache)})
    result = train_network(cfg)
    assert close(result.losses, GOLDEN_FLUX)
    assert {c.target.kohya_prefix for c in result.adapted} == {"lora_unet", "lora_te1"}
    stored = [load_file(f) for f in sorted((cache / "text").glob("*.safetensors"))]
    assert stored and all(set(t) == {"prompt_embeds"} for t in stored)  # T5 only: CLIP-L's pooled output is live
    again = train_network(flux_config(train={"cache_text_encoder_outputs": True, "output_name": "again"},
                                      dataset={"cache_dir": str(cache)}))
    assert again.losses == pytest.approx(result.losses, rel=1e-6)
    ups = [v for k, v in load_file(result.adapter_path).items() if k.startswith("lora_te1") and "lora_up" in k]
    assert ups and all(v.abs().sum() > 0 for v in ups)  # CLIP-L's adapter trained (lora_up starts at zero)


def test_golden_losses_full_fine_tune_and_single_file_reload(flux_config, tiny_flux):
    result = train_db(flux_config(**FULL_FINE_TUNE))
    assert close(result.losses, GOLDEN_FLUX_DB)
    reloaded = FluxFamily().load(_single_file_source({**tiny_flux, "transformer": result.model_path}))
    assert_same_weights(result.parts, reloaded)


def test_adapter_in_diffusers_every_key_consumed(flux_config, tiny_flux):
    """peft-layout file: FluxPipeline.load_lora_weights consumes every key, with our outputs."""
    from diffusers import FluxPipeline

    result, tensors, pipe = peft_adapter_in_pipeline(flux_config, FluxPipeline, tiny_flux["folder"])
    consumed = lora_layers(pipe.transformer, pipe.text_encoder)
    assert consumed == sum(len(c.layers) for c in result.adapted) == len(tensors) // 2
    family = FluxFamily()
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    theirs = pipeline_parts(pipe, result.parts.source, {"te1": pipe.text_encoder, "te3": pipe.text_encoder_2},
                            {"te1": pipe.tokenizer, "te3": pipe.tokenizer_2})
    assert torch.allclose(*(predict_caption(family, parts, latents) for parts in (result.parts, theirs)), atol=1e-5)
