"""SD3 / SD3.5 on the tiny SD3-architecture model: the shipped architectures (parameter counts), loading (folder,
SAI single file with and without its text encoders), the SAI layout against diffusers' converter, the text
conditioning against StableDiffusion3Pipeline.encode_prompt, the objective (sd-scripts' SD3 rules), golden losses of
adapter and full fine-tune runs, kohya files (fused qkv) and the peft file in diffusers."""
import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from conftest import FULL_FINE_TUNE, close, train_db, train_network
from goldens import GOLDEN_SD3, GOLDEN_SD3_DB
from library.families import get_family
from library.families.base import Components, ModelSource
from library.families.sd3 import Sd3Family, Sd3FlowMatchObjective
from library.loading import CheckpointError, arch_dir
from model_checks import assert_same_weights, inject_adapters


def _prediction(family, parts, captions=("a photo of a red circle",), seed=3):
    latents = torch.randn(len(captions), 16, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        text = family.encode_prompts(parts, list(captions), 1)
        return family.predict(parts, latents, torch.tensor([400.0] * len(captions)), text)


# ---- the real architectures ---------------------------------------------------------------------


def test_shipped_sd3_configs_build_the_real_architecture():
    """Parameters (pos_embed is a buffer in diffusers: the published 2B / 2.5B / 8.1B count it too)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    counts, pos = {}, {}
    for name in ("sd3-medium", "sd3.5-medium", "sd3.5-large"):
        with torch.device("meta"):
            config = SD3Transformer2DModel.load_config(str(arch_dir(name) / "transformer"))
            model = SD3Transformer2DModel.from_config(config)
        counts[name], pos[name] = count(model), model.pos_embed.pos_embed.numel()
    assert counts == {"sd3-medium": 2_028_328_000, "sd3.5-medium": 2_243_171_520, "sd3.5-large": 8_056_627_520}
    assert pos == {"sd3-medium": 192 * 192 * 1536, "sd3.5-medium": 384 * 384 * 1536, "sd3.5-large": 192 * 192 * 2432}
    arch = arch_dir("sd3-medium")
    with torch.device("meta"):
        clip_l = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(str(arch / "text_encoder")))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(str(arch / "text_encoder_2")))
        t5 = T5EncoderModel(T5Config.from_pretrained(str(arch / "text_encoder_3")))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(arch / "vae")))
    assert (count(clip_l), count(clip_g), count(t5), count(vae)) == (123_650_304, 694_659_840, 4_762_310_656,
                                                                      83_819_683)
    assert vae.config.scaling_factor == 1.5305 and vae.config.shift_factor == 0.0609


def test_sai_layout_is_the_inverse_of_diffusers_converter():
    """Ours -> SAI -> diffusers' own converter gives back the same tensors, with SD3.5's dual attention and qk norm
    (full width, 3 blocks; the last block's context stream is pre-only)."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    from library.sd3_layout import sai_module_name, transformer_to_sai

    torch.manual_seed(0)
    model = SD3Transformer2DModel(num_layers=3, attention_head_dim=8, num_attention_heads=3, caption_projection_dim=24,
                                  joint_attention_dim=32, pooled_projection_dim=16, pos_embed_max_size=8,
                                  dual_attention_layers=(0, 1), qk_norm="rms_norm")
    state = model.state_dict()
    sai = transformer_to_sai(state)
    assert sai["joint_blocks.0.x_block.attn.qkv.weight"].shape == (72, 24)
    assert "joint_blocks.1.x_block.attn2.qkv.weight" in sai and "joint_blocks.2.context_block.attn.ln_q.weight" in sai
    assert "joint_blocks.2.context_block.attn.proj.weight" not in sai
    theirs = convert_sd3_transformer_checkpoint_to_diffusers({"model.diffusion_model." + k: v for k, v in sai.items()})
    assert set(theirs) == set(state)
    assert all(torch.equal(theirs[k], state[k]) for k in state)
    assert sai_module_name("transformer_blocks.0.attn.to_k") == "joint_blocks.0.x_block.attn.qkv"
    assert sai_module_name("transformer_blocks.0.attn2.to_out.0") == "joint_blocks.0.x_block.attn2.proj"
    assert sai_module_name("transformer_blocks.1.ff_context.net.0.proj") == "joint_blocks.1.context_block.mlp.fc1"
    assert sai_module_name("transformer_blocks.2.norm1_context.linear", num_layers=3) is None  # (shift, scale) rows
    assert sai_module_name("context_embedder") == "context_embedder"


def test_kohya_layout_names_fused_qkv_as_sd_scripts():
    from library.sd3_layout import kohya_layout

    assert kohya_layout("transformer_blocks.0.attn.to_q") == ("joint_blocks.0.x_block.attn.qkv", 0, 3)
    assert kohya_layout("transformer_blocks.5.attn.add_v_proj") == ("joint_blocks.5.context_block.attn.qkv", 2, 3)
    assert kohya_layout("transformer_blocks.3.attn2.to_k") == ("joint_blocks.3.x_block.attn2.qkv", 1, 3)
    assert kohya_layout("transformer_blocks.0.attn.to_add_out") == ("joint_blocks.0.context_block.attn.proj", 0, 1)
    assert kohya_layout("transformer_blocks.7.norm1.linear") == ("joint_blocks.7.x_block.adaLN_modulation.1", 0, 1)
    assert kohya_layout("transformer_blocks.2.ff.net.0.proj") == ("joint_blocks.2.x_block.mlp.fc1", 0, 1)
    assert kohya_layout("transformer_blocks.23.norm1_context.linear", num_layers=24) is None
    assert kohya_layout("transformer_blocks.22.norm1_context.linear", num_layers=24) == (
        "joint_blocks.22.context_block.adaLN_modulation.1", 0, 1)
    assert kohya_layout("context_embedder") is None


# ---- loading ------------------------------------------------------------------------------------


def test_single_files_and_folder_give_identical_weights(tiny_sd3):
    for key in ("folder", "single", "transformer"):
        assert get_family("auto", str(tiny_sd3[key])).name == "sd3"
    family = Sd3Family()
    folder = family.load(ModelSource(str(tiny_sd3["folder"])))
    where = dict(arch=str(tiny_sd3["folder"]), tokenizer=str(tiny_sd3["folder"]))
    assert_same_weights(folder, family.load(ModelSource(str(tiny_sd3["single"]), **where)))
    separate = family.load(ModelSource(str(tiny_sd3["transformer"]), clip_l=str(tiny_sd3["clip_l"]),
                                       clip_g=str(tiny_sd3["clip_g"]), t5xxl=str(tiny_sd3["t5xxl"]), **where))
    assert_same_weights(folder, separate)
    with pytest.raises(CheckpointError, match="model.clip_l"):
        family.load(ModelSource(str(tiny_sd3["transformer"]), **where))
    with pytest.raises(CheckpointError, match="not a shipped SD3 architecture"):  # 2 blocks: no arch detected
        family.load(ModelSource(str(tiny_sd3["single"]), tokenizer=str(tiny_sd3["folder"])))


def test_other_families_keep_their_files(tiny_sd1, tiny_sdxl):
    assert not Sd3Family().claims(str(tiny_sd1[0])) and not Sd3Family().claims(str(tiny_sd1[1]))
    assert not Sd3Family().claims(str(tiny_sdxl[0])) and not Sd3Family().claims(str(tiny_sdxl[1]))
    assert get_family("auto", str(tiny_sdxl[1])).name == "sdxl" and get_family("auto", str(tiny_sd1[1])).name == "sd1"


def test_missing_tokenizers_name_the_setting(tiny_sd3, tmp_path):
    with pytest.raises(CheckpointError, match="model.tokenizer"):
        Sd3Family().load(ModelSource(str(tiny_sd3["single"]), arch=str(tiny_sd3["folder"]), tokenizer=str(tmp_path)))


# ---- conditioning, objective, prediction ----------------------------------------------------------


def test_text_conditioning_is_the_pipelines(tiny_sd3):
    family = Sd3Family()
    parts = family.load(ModelSource(str(tiny_sd3["folder"]), t5xxl_max_token_length=32))
    captions = ["a photo of a red circle", "blue"]
    pipe = family.pipeline(parts)
    for clip_skip in (1, 2):
        with torch.no_grad():
            ours = family.encode_prompts(parts, captions, clip_skip)
            embeds, _, pooled, _ = pipe.encode_prompt(captions, None, None, device="cpu", max_sequence_length=32,
                                                      do_classifier_free_guidance=False,
                                                      clip_skip=None if clip_skip == 1 else clip_skip - 1)
        assert ours["prompt_embeds"].shape == (2, 77 + 32, 96) and torch.equal(ours["prompt_embeds"], embeds)
        assert ours["pooled_prompt_embeds"].shape == (2, 32 + 48) and torch.equal(ours["pooled_prompt_embeds"], pooled)
    assert family.t5_max_length(family.load(ModelSource(str(tiny_sd3["folder"])))) == 256


def test_t5_attention_mask_zeroes_padding(tiny_sd3):
    family = Sd3Family()
    parts = family.load(ModelSource(str(tiny_sd3["folder"]), t5xxl_max_token_length=16, apply_t5_attn_mask=True))
    with torch.no_grad():
        out = family.encode_prompts(parts, ["blue"], 1)["prompt_embeds"]
    n = len(parts.tokenizers["te3"]("blue").input_ids)
    t5 = out[0, 77:]
    assert t5[n:].abs().max() == 0 and t5[:n].abs().max() > 0 and out[0, :77].abs().max() > 0


def test_objective_is_sd_scripts_sd3():
    """u uniform, shifted by training_shift, floored to an integer timestep; x_0 target with preconditioning."""
    o = Sd3FlowMatchObjective()
    assert o.discrete_flow_shift == 1.0 and o.weighting_scheme == "none" and o.model_prediction_type == "sigma_scaled"
    t = o.sample_timesteps(4, torch.Generator().manual_seed(0))
    u = torch.rand(4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(t, (u * 1000).floor().float())
    shifted = dataclasses.replace(o, discrete_flow_shift=3.0, min_timestep=100, max_timestep=900)
    s = 3 * u / (1 + 2 * u)
    assert torch.equal(shifted.sample_timesteps(4, torch.Generator().manual_seed(0)), (s * 800 + 100).floor().float())
    latents, noise, ts = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4), torch.tensor([250.0, 750.0])
    noisy = o.add_noise(latents, noise, ts)
    velocity = noise - latents  # a perfect velocity prediction gives back x_0 exactly
    assert torch.allclose(o.model_output(velocity, noisy, ts), o.target(latents, noise, ts), atol=1e-6)
    assert torch.equal(dataclasses.replace(o, model_prediction_type="raw").target(latents, noise, ts), velocity)


def test_prediction_is_the_pipelines_transformer_call(tiny_sd3):
    """predict passes the timestep s * 1000 as StableDiffusion3Pipeline does, and the latents unpacked."""
    family = Sd3Family()
    parts = family.load(ModelSource(str(tiny_sd3["folder"]), t5xxl_max_token_length=8))
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        text = family.encode_prompts(parts, ["a red dog"], 1)
        ours = family.predict(parts, latents, torch.tensor([500.0]), text)
        theirs = parts.denoiser(hidden_states=latents, timestep=torch.tensor([500.0]),
                                encoder_hidden_states=text["prompt_embeds"],
                                pooled_projections=text["pooled_prompt_embeds"]).sample
        other = family.predict(parts, latents, torch.tensor([0.5]), text)
    assert torch.equal(ours, theirs) and not torch.allclose(ours, other)
    assert family.swappable_blocks(parts) == list(parts.denoiser.transformer_blocks)
    assert family.file_metadata(parts)["modelspec.architecture"] == "stable-diffusion-v3.5-medium"  # dual attention
    image = family.sample(parts, "a red dog", 64, 48, 2, 0, "euler", 1, negative_prompt="blue", guidance_scale=5.0)
    again = family.sample(parts, "a red dog", 64, 48, 2, 0, "euler", 1, negative_prompt="blue", guidance_scale=5.0)
    other = family.sample(parts, "a red dog", 64, 48, 2, 0, "euler", 1, guidance_scale=5.0)
    assert image.size == (64, 48) and image.tobytes() == again.tobytes() != other.tobytes()  # CFG with the negative


# ---- training -----------------------------------------------------------------------------------


def _fresh_with_adapters(cfg, path):
    """The model of `cfg` loaded anew, the config's adapters injected and the file at `path` loaded into them."""
    from networks import files
    from networks.settings import NetworkSettings

    family = Sd3Family()
    parts = family.load(ModelSource.from_section(cfg.model))
    settings = NetworkSettings.from_network_section(cfg.network)
    adapted = inject_adapters(family, parts, settings)
    return parts, adapted, files.load_into(adapted, str(path), family.file_metadata(parts))


def test_golden_losses_lora_and_kohya_file(sd3_config):
    cfg = sd3_config()
    result = train_network(cfg)
    assert close(result.losses, GOLDEN_SD3)
    assert {c.target.kohya_prefix for c in result.adapted} == {"lora_unet", "lora_te1", "lora_te2"}
    names = {k.split(".", 1)[0] for k in load_file(result.adapter_path)}
    assert "lora_te1_text_model_encoder_layers_1_mlp_fc2" in names
    assert "lora_te2_text_model_encoder_layers_2_self_attn_q_proj" in names
    assert not any(n.startswith("lora_te3") for n in names)
    # sd-scripts' names: q, k, v fused into qkv (lora_down stacked, lora_up block-diagonal, alpha x 3)
    for name in ("joint_blocks_0_x_block_attn_qkv", "joint_blocks_0_context_block_attn_qkv",
                 "joint_blocks_0_x_block_attn2_qkv", "joint_blocks_0_x_block_attn2_proj",
                 "joint_blocks_1_x_block_mlp_fc2", "joint_blocks_0_context_block_adaLN_modulation_1"):
        assert "lora_unet_" + name in names, name
    assert "lora_transformer_transformer_blocks_1_norm1_context_linear" in names  # (shift, scale) rows in SAI: diffusers name
    assert not any("attn_to_q" in n or "add_k_proj" in n for n in names)
    tensors = load_file(result.adapter_path)
    qkv = "lora_unet_joint_blocks_0_x_block_attn_qkv"
    assert tensors[f"{qkv}.lora_down.weight"].shape == (12, 16) and tensors[f"{qkv}.lora_up.weight"].shape == (48, 12)
    assert float(tensors[f"{qkv}.alpha"]) == 6.0
    # the file loads back into fresh adapters: the same outputs
    parts, adapted, loaded = _fresh_with_adapters(cfg, result.adapter_path)
    assert len(names) == 55 and loaded == sum(len(c.layers) for c in adapted) == 65  # 5 fused qkv: 15 layers
    family = Sd3Family()
    fresh, trained = _prediction(family, parts), _prediction(family, result.parts)
    assert torch.allclose(fresh, trained, atol=1e-6)
    assert not torch.allclose(fresh, _prediction(family, family.load(ModelSource.from_section(cfg.model))), atol=1e-4)



def test_golden_losses_change_with_the_training_shift(sd3_config):
    result = train_network(sd3_config(loss={"discrete_flow_shift": 3.0}, train={"max_train_steps": 2}))
    assert not close(result.losses, GOLDEN_SD3[:2])


def test_cached_text_outputs_give_the_same_losses(sd3_config):
    result = train_network(sd3_config(train={"cache_text_encoder_outputs": True},
                                      network={"network_train_unet_only": True}))
    plain = train_network(sd3_config(network={"network_train_unet_only": True}, train={"output_name": "plain"}))
    assert result.losses == pytest.approx(plain.losses, rel=1e-6)


def test_t5_cached_while_both_clips_train_gives_the_golden_losses(sd3_config):
    """cache_text_encoder_outputs with trained CLIP-L / CLIP-G adapters: T5 alone is cached (sd-scripts' partial
    cache), the CLIPs run every step: the golden losses of encoding everything each step."""
    result = train_network(sd3_config(train={"cache_text_encoder_outputs": True}))
    assert close(result.losses, GOLDEN_SD3)
    assert {c.target.kohya_prefix for c in result.adapted} == {"lora_unet", "lora_te1", "lora_te2"}


def test_golden_losses_full_fine_tune_and_single_file_reload(sd3_config, tiny_sd3):
    result = train_db(sd3_config(**FULL_FINE_TUNE))
    assert close(result.losses, GOLDEN_SD3_DB)
    saved = load_file(result.model_path)
    assert "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight" in saved
    assert not any(k.startswith("text_encoders.t5xxl") for k in saved)  # T5 stays in its own file
    reloaded = Sd3Family().load(ModelSource(str(result.model_path), arch=str(tiny_sd3["folder"]),
                                            tokenizer=str(tiny_sd3["folder"]), t5xxl=str(tiny_sd3["t5xxl"])))
    assert_same_weights(result.parts, reloaded)


def test_peft_file_in_diffusers_every_key_consumed(sd3_config, tiny_sd3):
    """peft-layout file: StableDiffusion3Pipeline.load_lora_weights consumes every key, with our outputs."""
    from diffusers import StableDiffusion3Pipeline
    from peft.tuners.lora import LoraLayer

    # alpha = dim: diffusers reads no alpha from a peft-layout file (scale 1)
    result = train_network(sd3_config(save={"save_format": "peft"}, train={"max_train_steps": 2},
                                      network={"network_dim": 4, "network_alpha": 4.0}))
    tensors = load_file(result.adapter_path)
    assert {k.split(".", 1)[0] for k in tensors} == {"transformer", "text_encoder", "text_encoder_2"}
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3["folder"]))
    pipe.load_lora_weights(str(result.adapter_path))
    consumed = sum(isinstance(m, LoraLayer) for mod in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2)
                   for m in mod.modules())
    assert consumed == sum(len(c.layers) for c in result.adapted) == len(tensors) // 2 == 65
    theirs = Components(denoiser=pipe.transformer, vae=pipe.vae, noise_scheduler=pipe.scheduler,
                        text_encoders={"te1": pipe.text_encoder, "te2": pipe.text_encoder_2,
                                       "te3": pipe.text_encoder_3},
                        tokenizers={"te1": pipe.tokenizer, "te2": pipe.tokenizer_2, "te3": pipe.tokenizer_3},
                        source=result.parts.source)
    family = Sd3Family()
    assert torch.allclose(_prediction(family, result.parts), _prediction(family, theirs), atol=1e-5)


def test_block_swap_and_fp8_base_on_sd3(sd3_config):
    """SD3's joint blocks swap like FLUX's: the same losses (to the last bits: see SAME in test_memory_offload.py);
    fp8_base runs with the adapters in fp32."""
    checkpointed = {"gradient_checkpointing": True, "mixed_precision": "bf16"}
    frozen = {"network_train_unet_only": True}
    plain = train_network(sd3_config(train=checkpointed, network=frozen))
    swapped = train_network(sd3_config(train={**checkpointed, "blocks_to_swap": 2, "output_name": "swapped"},
                                       network=frozen))
    assert swapped.losses == pytest.approx(plain.losses, rel=1e-6, abs=1e-9)
    assert swapped.parts.denoiser._block_swapper.loads > 0
    fp8 = train_network(sd3_config(train={**checkpointed, "fp8_base": True, "output_name": "fp8"}, network=frozen))
    assert fp8.losses != plain.losses and fp8.losses == pytest.approx(plain.losses, rel=0.1)
    weights = {p.dtype for n, p in fp8.parts.denoiser.named_parameters() if "base_layer" in n}
    assert weights == {torch.float8_e4m3fn}
    assert {p.dtype for c in fp8.adapted for p in c.parameters()} == {torch.float32}
