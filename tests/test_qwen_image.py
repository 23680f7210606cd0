"""Qwen-Image on the tiny Qwen-Image-architecture model: the shipped architectures, the split-file layouts against
diffusers' converters, loading (folder, and ComfyUI's transformer / text_encoder / vae files), the text path of
the VL encoder against QwenImagePipeline, golden losses of adapter and full fine-tune runs, the same losses with
cached text outputs and with block swap, the adapter in diffusers and ComfyUI's names, samples against
QwenImagePipeline, and Edit pairs (control images)."""
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import (FULL_FINE_TUNE, assert_cached_text_outputs_change_nothing, assert_model_file_refused,
                      block_swapped_run, close, control_images, lora_layers, pipeline_parts, predict_caption,
                      split_files_source, train_db, train_network)
from goldens import GOLDEN_QWEN, GOLDEN_QWEN_DB
from library.families import get_family
from library.families.base import Components, ModelSource
from library.families.qwen_image import EDIT_TEMPLATE, TEMPLATE, QwenImageFamily, is_edit, prefix_length
from library.loading import CheckpointError, arch_dir
from model_checks import assert_same_weights, comfy_lora_names

# the run of goldens.GOLDEN_QWEN (seed 7, dim 4, alpha 2, batch 2, lr 1e-3, 64px, transformer adapters, qwen_shift
# timesteps, raw velocity) with control images
GOLDEN_QWEN_EDIT = [1.458911, 1.515605, 1.461036, 1.453970]


def _single_file_source(files, **extra):
    return split_files_source(files, "text_encoder", "vae", **extra)


def test_shipped_configs_build_the_real_architectures():
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import AutoConfig, Qwen2_5_VLTextModel

    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    with torch.device("meta"):
        models = {name: QwenImageTransformer2DModel.from_config(
            QwenImageTransformer2DModel.load_config(str(arch_dir(name) / "transformer")))
            for name in ("qwen-image", "qwen-image-edit", "qwen-image-edit-2511")}
        vae = AutoencoderKLQwenImage.from_config(AutoencoderKLQwenImage.load_config(str(arch_dir("qwen-image")),
                                                                                  subfolder="vae"))
        text = Qwen2_5_VLTextModel(AutoConfig.from_pretrained(str(arch_dir("qwen-image") / "text_encoder")).text_config)
    assert {count(m) for m in models.values()} == {20_430_401_088}  # "20B"; Edit shares the architecture
    assert [m.config.zero_cond_t for m in models.values()] == [False, False, True]
    assert count(vae) == 126_892_531 and count(text) == 7_070_619_136  # Qwen2.5-VL-7B without vision and lm_head


def test_vae_file_layout_is_the_inverse_of_diffusers_converter():
    """Ours -> the Wan-2.1 file layout -> diffusers' own converter gives back the same keys and shapes (full width,
    meta device)."""
    from diffusers import AutoencoderKLQwenImage
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    from library.qwen_image_layout import file_to_vae, vae_to_file

    with torch.device("meta"):
        vae = AutoencoderKLQwenImage.from_config(AutoencoderKLQwenImage.load_config(str(arch_dir("qwen-image")),
                                                                                  subfolder="vae"))
    state = vae.state_dict()
    file = vae_to_file(state)
    assert {"conv1.weight", "conv2.weight", "encoder.conv1.weight", "encoder.downsamples.0.residual.0.gamma",
            "encoder.middle.1.to_qkv.weight", "decoder.upsamples.4.shortcut.weight",
            "decoder.upsamples.3.time_conv.weight", "decoder.head.2.weight"} <= set(file)
    theirs = convert_wan_vae_to_diffusers(file)
    assert set(theirs) == set(state) == set(file_to_vae(file))
    assert all(theirs[k].shape == state[k].shape for k in state)


def test_single_files_and_folder_give_identical_weights(tiny_qwen):
    assert get_family("auto", str(tiny_qwen["folder"])).name == "qwen_image"
    assert get_family("auto", str(tiny_qwen["transformer"])).name == "qwen_image"
    text_file = set(load_file(tiny_qwen["text_encoder"]))  # ComfyUI's qwen_2.5_vl_7b layout, as ComfyUI detects it
    assert {"model.layers.0.self_attn.k_proj.bias", "model.embed_tokens.weight", "lm_head.weight"} <= text_file
    assert any(k.startswith("visual.blocks.0.") for k in text_file)
    family = QwenImageFamily()
    a = family.load(ModelSource(str(tiny_qwen["folder"])))
    b = family.load(_single_file_source(tiny_qwen))
    assert_same_weights(a, b)
    assert type(a.text_encoders["te"]).__name__ == "Qwen2_5_VLTextModel"  # the language model only
    with pytest.raises(CheckpointError, match="model.text_encoder, model.vae"):
        family.load(ModelSource(str(tiny_qwen["transformer"])))


def test_other_families_files_stay_theirs(tiny_sd1, tiny_qwen):
    assert not QwenImageFamily().claims(str(tiny_sd1[0])) and not QwenImageFamily().claims(str(tiny_sd1[1]))
    assert get_family("auto", str(tiny_qwen["vae"])).name != "qwen_image"


def test_edit_2511_files_carry_comfyui_marker(tmp_path):
    """An Edit-2511 transformer (reference tokens modulated at timestep zero) is written with ComfyUI's
    __index_timestep_zero__ marker, which loading reads and drops."""
    from library.tiny import save_tiny_qwen_image

    files = save_tiny_qwen_image(tmp_path / "tiny-2511", edit_2511=True)
    family = QwenImageFamily()
    parts = family.load(ModelSource(str(files["folder"])))
    state = family.single_file_state_dict(parts)
    assert "__index_timestep_zero__" in state and family.file_metadata(parts)["ss_base_model_version"] == \
        "qwen_image_edit"
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "2511.safetensors"))
    reloaded = family.load(_single_file_source({**files, "transformer": tmp_path / "2511.safetensors"}))
    assert reloaded.denoiser.config.zero_cond_t and is_edit(reloaded)
    assert_same_weights(parts, reloaded)
    # the reference tokens are modulated at timestep zero: the same weights without zero_cond_t predict otherwise
    g = torch.Generator().manual_seed(0)
    latents, reference = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 16, 8, 8, generator=g)
    plain_2509 = type(parts.denoiser).from_config({**parts.denoiser.config, "zero_cond_t": False})
    plain_2509.load_state_dict(parts.denoiser.state_dict())
    with torch.no_grad():
        text = family.encode_prompts(parts, ["a red dog"], 1)
        conditioning = {**text, "control_latents": reference}
        ours = family.predict(parts, latents, torch.tensor([500.0]), conditioning)
        other = family.predict(Components(**{**vars(parts), "denoiser": plain_2509}), latents, torch.tensor([500.0]),
                               conditioning)
    assert not torch.allclose(ours, other, atol=1e-4)


def test_text_conditioning_is_qwen_image_pipeline(tiny_qwen):
    """The chat template's system prefix dropped, the language model's last hidden state, padding masked: as
    QwenImagePipeline.encode_prompt."""
    from diffusers import QwenImagePipeline

    family = QwenImageFamily()
    parts = family.load(ModelSource(str(tiny_qwen["folder"])))
    tokenizer = parts.tokenizers["te"]
    drop = prefix_length(tokenizer, TEMPLATE)
    caption = "a photo of a red circle"
    kept = tokenizer(TEMPLATE.format(caption)).input_ids[drop:]
    assert kept[:len(tokenizer(caption).input_ids)] == tokenizer(caption).input_ids  # the caption comes first
    pipe = QwenImagePipeline.from_pretrained(str(tiny_qwen["folder"]))
    pipe.prompt_template_encode_start_idx = drop  # 34 with the real tokenizer; the tiny one splits more finely
    captions = [caption, "blue"]
    with torch.no_grad():
        ours = family.encode_prompts(parts, captions, 1)
        embeds, mask = pipe.encode_prompt(captions, device="cpu")
    assert torch.equal(ours["prompt_embeds"], embeds) and torch.equal(ours["prompt_embeds_mask"], mask.bool())
    assert ours["prompt_embeds_mask"][1].sum() < ours["prompt_embeds_mask"][0].sum() == mask.shape[1]
    assert prefix_length(tokenizer, EDIT_TEMPLATE) > drop  # Edit models' longer system prompt


def test_padding_does_not_reach_the_prediction(tiny_qwen):
    """A short caption predicts the same alone as padded beside a longer one in a batch (the mask, and the text
    trimmed to the batch's longest caption)."""
    family = QwenImageFamily()
    parts = family.load(ModelSource(str(tiny_qwen["folder"])))
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0, 300.0])
    with torch.no_grad():
        both = family.predict(parts, latents, t, family.encode_prompts(parts, ["a photo of a red circle", "blue"], 1))
        alone = family.predict(parts, latents[1:], t[1:], family.encode_prompts(parts, ["blue"], 1))
    assert torch.allclose(both[1:], alone, atol=1e-6)


def test_cached_outputs_of_other_lengths_join(tiny_qwen):
    """Text outputs cached in separate encoding batches have their own lengths; a training batch of them is padded
    to its longest and predicts as the captions encoded together."""
    from library.data.cache import cache_text_outputs
    from library.training import text_conditioning

    family = QwenImageFamily()
    parts = family.load(ModelSource(str(tiny_qwen["folder"])))
    captions = ["a photo of a red circle", "blue"]
    cached = cache_text_outputs(family, parts, captions, 1, None, say=lambda *_: None, device="cpu", batch_size=1)
    assert cached[captions[0]]["prompt_embeds"].shape[1] > cached[captions[1]]["prompt_embeds"].shape[1]
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        joined = text_conditioning(family, parts, captions, 1, cached, False, "cpu")
        direct = family.encode_prompts(parts, captions, 1)
        assert torch.equal(joined["prompt_embeds_mask"], direct["prompt_embeds_mask"])
        outs = [family.predict(parts, latents, torch.tensor([500.0, 300.0]), c) for c in (joined, direct)]
    assert torch.allclose(*outs, atol=1e-6)


def test_qwen_shift_is_the_pipeline_shift():
    """timestep_sampling = qwen_shift: a sigmoid draw shifted as Qwen-Image's scheduler shifts at this size
    (exp(mu) about 2.3 at 1328px)."""
    import math

    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    from library.objectives import FlowMatchObjective

    objective = FlowMatchObjective(timestep_sampling="qwen_shift")
    g, again = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    s = objective.sample_timesteps(4, g, latent_shape=(4, 16, 166, 166)).double() / 1000
    mu = calculate_shift(83 * 83, 256, 8192, 0.5, 0.9)
    u = torch.sigmoid(torch.randn(4, generator=again, dtype=torch.float64))
    assert torch.allclose(s, math.exp(mu) / (math.exp(mu) + 1 / u - 1), atol=1e-6)
    assert 2.2 < math.exp(mu) < 2.4


# ---- training -----------------------------------------------------------------------------------


def test_golden_losses_lora(qwen_config):
    result = train_network(qwen_config())
    assert close(result.losses, GOLDEN_QWEN)
    assert {c.target.kohya_prefix for c in result.adapted} == {"lora_unet"}
    names = {k.split(".", 1)[0] for k in load_file(result.adapter_path)}
    assert {"lora_unet_transformer_blocks_0_attn_to_q", "lora_unet_transformer_blocks_0_attn_add_k_proj",
            "lora_unet_transformer_blocks_1_attn_to_add_out", "lora_unet_transformer_blocks_1_img_mlp_net_0_proj",
            "lora_unet_transformer_blocks_0_txt_mod_1", "lora_unet_transformer_blocks_1_attn_to_out_0"} <= names
    assert len(names) == 2 * 14  # 14 Linears per block: q k v out, add q k v out, 2 + 2 MLP, 2 modulation


def test_adapter_names_are_comfyui_names(qwen_config, tiny_qwen):
    """ComfyUI maps lora_unet_ + each diffusion_model weight's name with dots as underscores (its Qwen-Image model
    has diffusers' names): every module of the file is one of them."""
    result = train_network(qwen_config(train={"max_train_steps": 1}))
    names = {k.split(".", 1)[0] for k in load_file(result.adapter_path)}
    assert names and names <= set(comfy_lora_names(load_file(tiny_qwen["transformer"])))


def test_cached_text_outputs_give_the_same_losses(qwen_config):
    assert_cached_text_outputs_change_nothing(qwen_config)


def test_block_swap_gives_the_same_losses(qwen_config):
    assert block_swapped_run(qwen_config, 1).parts.denoiser._block_swapper.loads == 2 * 2


def test_fp8_base_with_block_swap(qwen_config, tmp_path):
    """fp8_base on Qwen-Image (the 24 GB recipe with blocks swapped): the frozen Linears in float8, the adapters in
    fp32, losses within 5% of bf16's (float8's 3 mantissa bits on the tiny weights); samples between steps are
    rendered in the run's precision (fp32 sampler latents met the bf16 compute copies before)."""
    bf16 = {"mixed_precision": "bf16", "gradient_checkpointing": True, "max_train_steps": 2}
    plain = train_network(qwen_config(train=bf16))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 64 --h 64 --s 2 --d 3\n")
    fp8 = train_network(qwen_config(train={**bf16, "fp8_base": True, "blocks_to_swap": 1}, save={"overwrite": True},
                                    sample={"sample_prompts": str(prompts), "sample_every_n_steps": 1}))
    assert len(fp8.samples) == 2
    layer = fp8.parts.denoiser.transformer_blocks[0].attn.to_q
    assert layer.base_layer.weight.dtype == torch.float8_e4m3fn and fp8.parts.denoiser.img_in.weight.dtype == \
        torch.float8_e4m3fn
    assert fp8.parts.denoiser.transformer_blocks[0].attn.norm_q.weight.dtype == torch.bfloat16  # not a Linear
    assert {p.dtype for c in fp8.adapted for p in c.parameters()} == {torch.float32}
    assert fp8.losses != plain.losses and fp8.losses == pytest.approx(plain.losses, rel=0.05)


def test_golden_losses_full_fine_tune_and_single_file_reload(qwen_config, tiny_qwen):
    result = train_db(qwen_config(**FULL_FINE_TUNE))
    assert close(result.losses, GOLDEN_QWEN_DB)
    assert get_family("auto", str(result.model_path)).name == "qwen_image"
    reloaded = QwenImageFamily().load(_single_file_source({**tiny_qwen, "transformer": result.model_path}))
    assert_same_weights(result.parts, reloaded)


def test_full_fine_tune_saved_as_diffusers_folder_reloads(qwen_config):
    """save_model_as = "diffusers": a QwenImagePipeline folder (its text_encoder the language model alone), which
    loads back to the same weights."""
    from diffusers import QwenImagePipeline

    result = train_db(qwen_config(optimizer={"optimizer_type": "Adafactor", "learning_rate": 1e-4},
                                  dreambooth={"train_text_encoder": False}, train={"max_train_steps": 1},
                                  save={"save_model_as": "diffusers"}))
    assert_same_weights(result.parts, QwenImageFamily().load(ModelSource(str(result.model_path))))
    assert QwenImagePipeline.from_pretrained(str(result.model_path)).transformer.config.num_layers == 2


def test_missing_tokenizer_names_the_key(tiny_qwen, tmp_path):
    with pytest.raises(CheckpointError, match="Qwen2.5-VL tokenizer not found in .*nowhere.* HF_HUB_OFFLINE is set.*"
                                              "set model.tokenizer"):
        QwenImageFamily().load(_single_file_source(tiny_qwen, tokenizer=str(tmp_path / "nowhere")))


@pytest.mark.parametrize("save_format", ["kohya", "peft"])
def test_adapter_in_diffusers_every_key_consumed(save_format, qwen_config, tiny_qwen):
    """QwenImagePipeline.load_lora_weights reads the kohya file (its Qwen converter, alpha applied) and the peft
    file, adapting every layer we trained, with our outputs."""
    from diffusers import QwenImagePipeline

    # peft layout: alpha = dim (diffusers reads no alpha from a peft-layout file: scale 1)
    result = train_network(qwen_config(save={"save_format": save_format}, train={"max_train_steps": 2},
                                       network={"network_dim": 4,
                                                "network_alpha": 4.0 if save_format == "peft" else 2.0}))
    tensors = load_file(result.adapter_path)
    pipe = QwenImagePipeline.from_pretrained(str(tiny_qwen["folder"]))
    pipe.load_lora_weights(str(result.adapter_path))
    consumed = lora_layers(pipe.transformer)
    per_layer = 3 if save_format == "kohya" else 2  # lora_down, lora_up (, alpha)
    assert consumed == sum(len(c.layers) for c in result.adapted) == len(tensors) // per_layer
    family = QwenImageFamily()
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    theirs = pipeline_parts(pipe, result.parts.source, {"te": pipe.text_encoder.model.language_model},
                            {"te": pipe.tokenizer})
    untrained = family.load(ModelSource(str(tiny_qwen["folder"]))).denoiser
    base = Components(**{**vars(theirs), "denoiser": untrained})
    ours, with_lora, without = (predict_caption(family, p, latents) for p in (result.parts, theirs, base))
    assert torch.allclose(ours, with_lora, atol=1e-5) and not torch.allclose(ours, without, atol=1e-4)


def test_samples_are_qwen_image_pipeline(tiny_qwen, tmp_path):
    """A sample is QwenImagePipeline's (true CFG with its norm rescale) over the conditioning training uses; a
    control image (--ci) changes it."""
    import numpy as np
    from diffusers import QwenImagePipeline

    family = QwenImageFamily()
    parts = family.load(ModelSource(str(tiny_qwen["folder"])))

    def sample(seed=5, control=None):
        return np.asarray(family.sample(parts, "a red dog", 64, 64, 2, seed, "euler", 1, "blurry", 4.0,
                                        control_image=control))

    pipe = QwenImagePipeline.from_pretrained(str(tiny_qwen["folder"]))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        positive, negative = (family.encode_prompts(parts, [t], 1) for t in ("a red dog", "blurry"))
    theirs = pipe(prompt_embeds=positive["prompt_embeds"], prompt_embeds_mask=positive["prompt_embeds_mask"].long(),
                  negative_prompt_embeds=negative["prompt_embeds"],
                  negative_prompt_embeds_mask=negative["prompt_embeds_mask"].long(), true_cfg_scale=4.0, width=64,
                  height=64, num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(5)).images[0]
    first = sample()
    assert first.shape == (64, 64, 3) and np.array_equal(first, np.asarray(theirs))
    assert not np.array_equal(first, sample(seed=6))
    reference = tmp_path / "ref.png"
    Image.fromarray((torch.rand(48, 80, 3, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
                    .numpy()).save(reference)
    assert not np.array_equal(first, sample(control=str(reference)))


def test_samples_during_an_edit_run(qwen_config, tiny_data, tmp_path):
    """Sampling between steps of an Edit run, with a reference image (--ci) and true CFG (--l)."""
    control = control_images(tiny_data, tmp_path / "control", 1)
    reference = sorted(control.iterdir())[0]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a red circle --n blurry --w 64 --h 64 --s 2 --l 4 --d 3 --ci {reference}\n")
    result = train_network(qwen_config(dataset={"control_directory": str(control)}, train={"max_train_steps": 2},
                                       sample={"sample_prompts": str(prompts), "sample_every_n_steps": 1}))
    assert len(result.samples) == 2 and all(Image.open(p).size == (64, 64) for p in result.samples)  # steps 1, 2
    assert result.losses == pytest.approx(GOLDEN_QWEN_EDIT[:2], rel=1e-5)  # sampling leaves training as it is


# ---- Edit pairs --------------------------------------------------------------------------------


def test_reference_tokens_are_qwen_image_edit_plus_pipeline(tiny_qwen):
    """predict() with control latents = the transformer called on QwenImageEditPlusPipeline's input: the packed
    reference after the image tokens, one RoPE frame each in img_shapes, the prediction read from the image
    tokens."""
    from diffusers import QwenImageEditPlusPipeline as Edit

    family = QwenImageFamily()
    parts = family.load(ModelSource(str(tiny_qwen["folder"])))
    g = torch.Generator().manual_seed(0)
    latents, reference = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 16, 6, 10, generator=g)
    with torch.no_grad():
        text = family.encode_prompts(parts, ["a red dog"], 1)
        ours = family.predict(parts, latents, torch.tensor([500.0]), {**text, "control_latents": reference})
        plain = family.predict(parts, latents, torch.tensor([500.0]), text)
        tokens = torch.cat([Edit._pack_latents(latents, 1, 16, 8, 8), Edit._pack_latents(reference, 1, 16, 6, 10)], 1)
        out = parts.denoiser(hidden_states=tokens, encoder_hidden_states=text["prompt_embeds"],
                             timestep=torch.tensor([0.5]), img_shapes=[[(1, 4, 4), (1, 3, 5)]]).sample[:, :16]
    assert torch.allclose(ours, Edit._unpack_latents(out, 64, 64, 8)[:, :, 0], atol=1e-6)
    assert not torch.allclose(ours, plain)


def test_edit_run_golden_losses_and_the_control_image_matters(qwen_config, tiny_data, tmp_path):
    def run(control):
        return train_network(qwen_config(dataset={"control_directory": str(control)}, save={"overwrite": True})).losses

    first = run(control_images(tiny_data, tmp_path / "control-a", 1))
    assert close(first, GOLDEN_QWEN_EDIT) and not close(first, GOLDEN_QWEN)
    other = run(control_images(tiny_data, tmp_path / "control-b", 2, flat=True))
    again = run(tmp_path / "control-a")
    # the random tiny transformer mixes the reference tokens in weakly: other controls move the losses by 5e-5 on
    # average, 30x the spread of the same pairs run again (below 1e-6 relative, checked next)
    assert sum(abs(a - b) for a, b in zip(first, other)) / 4 > 1e-5
    assert again == pytest.approx(first, rel=1e-6)


def test_cached_control_latents_give_the_same_edit_losses(qwen_config, tiny_data, tmp_path):
    """Kontext's latent cache holds the control latents too (encoded with the VAE's mode: the same numbers)."""
    control = control_images(tiny_data, tmp_path / "control", 1)
    cfg = qwen_config(dataset={"control_directory": str(control)}, train={"max_train_steps": 2})
    cfg.dataset.cache_latents_to_disk, cfg.dataset.cache_dir = True, str(tmp_path / "cache")
    cached = train_network(cfg)
    assert len(list((tmp_path / "cache" / "latents").iterdir())) == 8
    assert cached.losses == pytest.approx(GOLDEN_QWEN_EDIT[:2], rel=1e-5)


def test_a_damaged_text_encoder_file_is_named_before_loading(tiny_qwen, tmp_path, config_error):
    damaged = tmp_path / "qwen_2.5_vl_7b.safetensors"
    damaged.write_bytes(tiny_qwen["text_encoder"].read_bytes()[:5000])
    config, line = config_error({"pretrained_model_name_or_path": str(tiny_qwen["transformer"]),
                                 "text_encoder": str(damaged), "vae": str(tiny_qwen["vae"])}, "qwen.toml")
    assert line.startswith(f"config error: {config}: 'model.text_encoder': ") and "truncated" in line


@pytest.mark.parametrize("model, said", [
    ({}, "a Qwen-Image transformer file holds the transformer only; set model.text_encoder, model.vae to the "
         "separate files"),
    ({"family": "flux"}, "is a checkpoint of family \"qwen_image\" (from its tensor names), but 'model.family' = "
                         "\"flux\": set model.family = \"qwen_image\""),
])
def test_qwen_file_faults_exit_2_naming_the_key(model, said, tiny_qwen, config_error):
    assert_model_file_refused(config_error, tiny_qwen["transformer"], said, **model)


# ---- the planner -------------------------------------------------------------------------------


@pytest.mark.parametrize("name, arch", [("Qwen/Qwen-Image", "qwen-image"),
                                        ("/m/qwen_image_bf16.safetensors", "qwen-image"),
                                        ("Qwen/Qwen-Image-Edit-2509", "qwen-image-edit"),
                                        ("/m/qwen_image_edit_2511_bf16.safetensors", "qwen-image-edit-2511")])
def test_known_names_plan_qwen_image(name, arch):
    import types

    from library.planner.architecture import resolve

    model = types.SimpleNamespace(pretrained_model_name_or_path=name, family="auto", arch=None, v2=False)
    assert resolve(model) == ("qwen_image", arch)


def test_plan_of_the_tiny_architecture_sees_fp8_and_block_swap(tiny_qwen):
    """The planner runs the Qwen-Image step (the language model only, the planning tokenizer's 512 caption
    tokens, sampling with the 3D VAE's decode): fp8_base halves the frozen transformer's Linear weights;
    blocks_to_swap is planned."""
    import dataclasses

    from library.config import NetworkSection
    from library.planner import plan
    from library.planner.step import StepSettings

    base = StepSettings(recipe="network", family="qwen_image", arch=str(tiny_qwen["folder"]), width=64, height=64,
                        mixed_precision="bf16", gradient_checkpointing=True, cache_latents=True,
                        cache_text_encoder_outputs=True, train_text_encoder=False, sample=True,
                        network=NetworkSection(network_dim=4, network_alpha=4))
    plain, fp8, swapped = (plan(dataclasses.replace(base, **k)) for k in ({}, {"fp8_base": True},
                                                                         {"blocks_to_swap": 1}))
    assert plain.breakdown["adapter weights"] > 0 and plain.text_peak > 0 and "sample" in plain.phases
    assert fp8.breakdown["weights"] < 0.75 * plain.breakdown["weights"]
    # two blocks: the one running and the one prefetched are both on the card at the peak; the swap is planned
    assert swapped.breakdown["weights"] == plain.breakdown["weights"]
    assert any("blocks_to_swap 1" in n and "s/step" in n for n in swapped.notes)
