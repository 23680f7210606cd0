"""Chroma on the tiny Chroma-architecture model: the shipped architecture, the single-file layout against
diffusers' converter, loading (folder, and the transformer file with separate t5xxl / ae files), the T5-only
conditioning with its attention mask against diffusers' ChromaPipeline, golden losses of adapter and full
fine-tune runs, the same losses with cached text outputs and with block swap, the adapter in diffusers."""
import pytest
import torch
from safetensors.torch import load_file

from conftest import (FULL_FINE_TUNE, assert_cached_text_outputs_change_nothing, assert_model_file_refused,
                      assert_samples_reproducible, block_swapped_run, close, lora_layers, peft_adapter_in_pipeline,
                      pipeline_parts, predict_caption, split_files_source, train_db, train_network)
from goldens import GOLDEN_CHROMA, GOLDEN_CHROMA_DB
from library.families import get_family
from library.families.base import ModelSource
from library.families.chroma import ChromaFamily
from library.families.flux import FluxFamily
from library.loading import CheckpointError, arch_dir
from model_checks import assert_same_weights


def _single_file_source(files, **extra):
    return split_files_source(files, "t5xxl", "ae", **extra)


def test_shipped_chroma_config_builds_the_real_architecture():
    from diffusers import ChromaTransformer2DModel

    with torch.device("meta"):
        model = ChromaTransformer2DModel.from_config(
            ChromaTransformer2DModel.load_config(str(arch_dir("chroma") / "transformer")))
    assert sum(p.numel() for p in model.parameters()) == 8_899_983_424  # "8.9B"


def test_single_file_layout_is_the_inverse_of_diffusers_converter():
    """Ours -> file -> diffusers' own converter gives back the same keys and shapes (full width, meta device)."""
    from diffusers import ChromaTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_chroma_transformer_checkpoint_to_diffusers

    from library.chroma_layout import file_to_transformer, transformer_to_file

    with torch.device("meta"):
        model = ChromaTransformer2DModel(num_layers=1, num_single_layers=1, approximator_layers=2)
    state = model.state_dict()
    file = transformer_to_file(state)
    assert {"distilled_guidance_layer.layers.1.out_layer.weight", "distilled_guidance_layer.norms.0.scale",
            "double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "txt_in.weight"} <= set(file)
    assert not any("_mod." in k or "modulation" in k or k.startswith(("time_in", "vector_in")) for k in file)
    theirs = convert_chroma_transformer_checkpoint_to_diffusers({"model.diffusion_model." + k: v
                                                                 for k, v in file.items()})
    ours = file_to_transformer(file)
    assert set(theirs) == set(state) == set(ours)
    assert all(theirs[k].shape == state[k].shape == ours[k].shape for k in state)


def test_single_files_and_folder_give_identical_weights(tiny_chroma):
    assert get_family("auto", str(tiny_chroma["folder"])).name == "chroma"
    assert get_family("auto", str(tiny_chroma["transformer"])).name == "chroma"
    assert not FluxFamily().claims(str(tiny_chroma["transformer"]))  # FLUX.1's block names, not FLUX.1
    family = ChromaFamily()
    a = family.load(ModelSource(str(tiny_chroma["folder"])))
    b = family.load(_single_file_source(tiny_chroma))
    assert_same_weights(a, b)
    assert torch.equal(a.denoiser.time_text_embed.mod_proj, b.denoiser.time_text_embed.mod_proj)
    with pytest.raises(CheckpointError, match="model.t5xxl, model.ae"):
        family.load(ModelSource(str(tiny_chroma["transformer"])))


def test_flux_files_stay_with_flux(tmp_path):
    from library.tiny import save_tiny_flux

    flux = save_tiny_flux(tmp_path / "tiny-flux", guidance=False)
    assert not ChromaFamily().claims(str(flux["transformer"])) and not ChromaFamily().claims(str(flux["folder"]))
    assert get_family("auto", str(flux["transformer"])).name == "flux"


def test_text_conditioning_is_chroma_pipeline(tiny_chroma):
    """T5 alone, run with the padding mask; the transformer sees the caption and its first padding token."""
    family = ChromaFamily()
    parts = family.load(ModelSource(str(tiny_chroma["folder"]), t5xxl_max_token_length=16))
    captions = ["a photo of a red circle", "blue"]
    with torch.no_grad():
        ours = family.encode_prompts(parts, captions, 1)
        embeds, _, mask, *_ = family.pipeline(parts).encode_prompt(captions, None, device="cpu",
                                                                    do_classifier_free_guidance=False,
                                                                    max_sequence_length=16)
    assert ours["prompt_embeds"].shape == (2, 16, 48) and torch.allclose(ours["prompt_embeds"], embeds, atol=1e-5)
    assert torch.equal(ours["t5_attention_mask"], mask.bool())
    n = len(parts.tokenizers["te3"]("blue").input_ids)
    assert ours["t5_attention_mask"][1].sum() == n + 1


def test_masked_text_tokens_do_not_reach_the_image(tiny_chroma):
    """Changing a text token past the first padding token leaves the prediction as it is; changing the first
    padding token (which Chroma sees) or a caption token changes it."""
    family = ChromaFamily()
    parts = family.load(ModelSource(str(tiny_chroma["folder"]), t5xxl_max_token_length=16))
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        text = family.encode_prompts(parts, ["blue"], 1)
        seen = int(text["t5_attention_mask"].sum())

        def predict_with(position):
            embeds = text["prompt_embeds"].clone()
            if position is not None:
                embeds[0, position] += 5.0
            return family.predict(parts, latents, torch.tensor([500.0]), {**text, "prompt_embeds": embeds})

        base = predict_with(None)
        assert torch.equal(predict_with(seen), base)  # the second padding token: masked
        assert not torch.allclose(predict_with(seen - 1), base)  # the first padding token: seen
        assert not torch.allclose(predict_with(0), base)


# ---- training -----------------------------------------------------------------------------------


def test_golden_losses_lora(chroma_config):
    result = train_network(chroma_config())
    assert close(result.losses, GOLDEN_CHROMA)
    assert {c.target.kohya_prefix for c in result.adapted} == {"lora_unet"}
    names = {k.split(".", 1)[0] for k in load_file(result.adapter_path)}
    assert "lora_unet_double_blocks_0_img_attn_qkv" in names and "lora_unet_single_blocks_1_linear1" in names
    assert "lora_unet_double_blocks_1_txt_mlp_2" in names and not any("_mod_" in n for n in names)


def test_sd_scripts_model_type_selects_chroma(tmp_path, tiny_chroma, tiny_data):
    from library.config_files import load_config

    path = tmp_path / "flat.toml"
    path.write_text(f'pretrained_model_name_or_path = "{tiny_chroma["folder"].as_posix()}"\nmodel_type = "chroma"\n'
                    f't5xxl_max_token_length = 16\ntrain_data_dir = "{tiny_data.as_posix()}"\n'
                    f'output_dir = "{(tmp_path / "out").as_posix()}"\n')
    assert load_config(path).model.family == "chroma"


def test_cached_text_outputs_give_the_same_losses(chroma_config):
    assert_cached_text_outputs_change_nothing(chroma_config)


def test_block_swap_gives_the_same_losses(chroma_config):
    assert block_swapped_run(chroma_config, 4).parts.denoiser._block_swapper.loads == 2 * 8


def test_golden_losses_full_fine_tune_and_single_file_reload(chroma_config, tiny_chroma):
    result = train_db(chroma_config(**FULL_FINE_TUNE))
    assert close(result.losses, GOLDEN_CHROMA_DB)
    reloaded = ChromaFamily().load(_single_file_source({**tiny_chroma, "transformer": result.model_path}))
    assert_same_weights(result.parts, reloaded)


def test_adapter_in_diffusers_every_key_consumed(chroma_config, tiny_chroma):
    """peft-layout file: ChromaPipeline.load_lora_weights consumes every key, with our outputs."""
    from diffusers import ChromaPipeline

    result, tensors, pipe = peft_adapter_in_pipeline(chroma_config, ChromaPipeline, tiny_chroma["folder"])
    assert lora_layers(pipe.transformer) == sum(len(c.layers) for c in result.adapted) == len(tensors) // 2
    family = ChromaFamily()
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    theirs = pipeline_parts(pipe, result.parts.source, {"te3": pipe.text_encoder}, {"te3": pipe.tokenizer})
    assert torch.allclose(*(predict_caption(family, parts, latents) for parts in (result.parts, theirs)), atol=1e-5)


@pytest.mark.parametrize("model, said", [
    ({}, "a Chroma transformer file holds the transformer only; set model.t5xxl, model.ae to the separate files"),
    ({"family": "flux"}, "is a checkpoint of family \"chroma\" (from its tensor names), but 'model.family' = "
                         "\"flux\": set model.family = \"chroma\""),
])
def test_chroma_file_faults_exit_2_naming_the_key(model, said, tiny_chroma, config_error):
    assert_model_file_refused(config_error, tiny_chroma["transformer"], said, **model)


def test_samples_use_the_training_mask_and_the_negative_prompt(tiny_chroma):
    """A sample is ChromaPipeline's Euler loop over the conditioning training uses (boolean mask); with CFG the
    negative prompt changes it; a sample is reproducible from its seed."""
    import numpy as np

    family = ChromaFamily()
    parts = family.load(ModelSource(str(tiny_chroma["folder"]), t5xxl_max_token_length=16))

    def sample(negative, seed=5):
        return np.asarray(family.sample(parts, "a red dog", 64, 64, 2, seed, "euler", 1, negative, 4.0))

    assert_samples_reproducible(sample)
    captured = []
    denoiser_forward = parts.denoiser.forward

    def spy(*args, **kwargs):
        captured.append(kwargs["attention_mask"])
        return denoiser_forward(*args, **kwargs)

    parts.denoiser.forward = spy
    sample("blurry")
    text = family.encode_prompts(parts, ["a red dog"], 1)["t5_attention_mask"]
    assert captured and all(m.dtype == torch.bool for m in captured)
    assert torch.equal(captured[0][:, :16], text) and captured[0][:, 16:].all()



def _wide_chroma_parts():
    """Chroma at its real width (3072: diffusers' FLUX kohya converter assumes linear1 = 3 x 3072 + 12288) with one
    block of each kind, around the tiny T5 and VAE, as our Components."""
    from diffusers import ChromaTransformer2DModel

    from library.families.base import Components
    from library.tiny import build_tiny_chroma

    parts = build_tiny_chroma()
    torch.manual_seed(0)
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=parts["text_encoder"].config.d_model, axes_dims_rope=(16, 56, 56),
        approximator_num_channels=16, approximator_hidden_dim=32, approximator_layers=1)
    return Components(denoiser=transformer, vae=parts["vae"], noise_scheduler=parts["scheduler"],
                      text_encoders={"te3": parts["text_encoder"]}, tokenizers={"te3": parts["tokenizer"]},
                      source=ModelSource("wide-chroma", t5xxl_max_token_length=16))


@pytest.mark.slow
def test_kohya_file_in_diffusers_every_key_consumed_and_equal_to_our_merge(tmp_path):
    """A kohya file as a run writes it (FLUX.1's lora_unet_ names, q/k/v and the single blocks' MLP input fused):
    ChromaPipeline.load_lora_weights (diffusers' FLUX kohya converter) consumes every key, one LoRA layer per
    adapted module and no warning, with the outputs of our live adapter and of our merge into the base."""
    import copy
    import logging

    from diffusers import ChromaPipeline

    from networks import files
    from networks.merge import merge_lora
    from networks.settings import settings_from
    from networks.targets import inject

    family, ours = ChromaFamily(), _wide_chroma_parts()
    base = copy.deepcopy(ours.denoiser)
    pipe = ChromaPipeline(transformer=copy.deepcopy(base), vae=ours.vae, scheduler=ours.noise_scheduler,
                          text_encoder=ours.text_encoders["te3"], tokenizer=ours.tokenizers["te3"])
    adapted = [inject(ours.denoiser, t, settings_from({"module": "networks.lora", "dim": 4, "alpha": 2.0}))
               for t in family.adapter_targets(ours)]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained-looking adapter weights (peft starts at a zero delta)
        for p in (p for c in adapted for p in c.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    path = tmp_path / "chroma-kohya.safetensors"
    tensors, extra = files.adapter_tensors(adapted, "kohya", torch.float32)
    files.save(path, tensors, extra)
    layers = {k.split(".", 1)[0] for k in load_file(path)}
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1"} <= layers

    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("diffusers").addHandler(handler)
    try:
        pipe.load_lora_weights(str(path))
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    # "Unsupported keys ..." and peft's unexpected keys are warnings; that T5 has no keys is the one expected
    assert not [w for w in warnings if not w.startswith("No LoRA keys associated to T5EncoderModel")], warnings
    assert lora_layers(pipe.transformer) == sum(len(c.layers) for c in adapted)
    merged = _wide_chroma_parts()
    merged.denoiser = copy.deepcopy(base)
    assert merge_lora({"denoiser": merged.denoiser}, family.adapter_targets(merged), str(path)) == len(layers)
    theirs = pipeline_parts(pipe, ours.source, {"te3": pipe.text_encoder}, {"te3": pipe.tokenizer})
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    outs = [predict_caption(family, parts, latents) for parts in (ours, theirs, merged)]
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outs[2], outs[0], atol=1e-5, rtol=1e-4)
    pipe.transformer.disable_lora()
    assert (outs[0] - predict_caption(family, theirs, latents)).abs().max() > 1e-2  # the adapter matters
