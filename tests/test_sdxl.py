"""SDXL on the tiny SDXL-architecture model: loading (folder, SAI single file, auto detection), the text
conditioning against diffusers' own pipeline, the size conditioning, golden losses of adapter and full
fine-tune runs, and the LoRA file in diffusers."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import close, train_db, train_network
from goldens import GOLDEN_SDXL, GOLDEN_SDXL_DB
from library.families import get_family
from library.families.base import ModelSource
from library.families.sdxl import SDXLFamily, add_time_ids, detect_arch
from library.loading import CheckpointError, arch_dir
from model_checks import assert_same_weights, part_states


def test_single_file_and_folder_give_identical_weights(tiny_sdxl):
    folder, single = tiny_sdxl
    assert get_family("auto", str(folder)).name == get_family("auto", str(single)).name == "sdxl"
    family = SDXLFamily()
    a = family.load(ModelSource(str(folder)))
    b = family.load(ModelSource(str(single), arch=str(folder), tokenizer=str(folder)))
    assert_same_weights(a, b)
    assert type(b.text_encoders["te2"]).__name__ == "CLIPTextModelWithProjection"
    for name in ("te1", "te2"):
        assert a.tokenizers[name]("a red dog").input_ids == b.tokenizers[name]("a red dog").input_ids
    assert b.tokenizers["te2"].pad_token == "!" and b.tokenizers["te1"].pad_token == "<|endoftext|>"


def test_auto_detection_keeps_sd1_files_with_sd1(tiny_sd1, tiny_sdxl):
    assert get_family("auto", str(tiny_sd1[0])).name == get_family("auto", str(tiny_sd1[1])).name == "sd1"
    from library.families.sd1 import SD1Family

    assert not SD1Family().claims(str(tiny_sdxl[1])) and not SD1Family().claims(str(tiny_sdxl[0]))


def test_shipped_sdxl_architecture_detected_from_key_shapes():
    prefix = "model.diffusion_model."
    fake = {prefix + "input_blocks.0.0.weight": torch.empty(320, 4, 3, 3),
            prefix + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": torch.empty(640, 2048)}
    assert detect_arch(fake) == arch_dir("sdxl")
    fake[prefix + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"] = torch.empty(640, 768)
    with pytest.raises(CheckpointError, match="set model.arch"):
        detect_arch(fake)  # an SD1 U-Net is not an SDXL architecture


def test_shipped_sdxl_configs_build_the_real_architecture():
    """The shipped configs give SDXL base 1.0's parameter counts (on the meta device: no memory)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    arch = arch_dir("sdxl")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(arch / "unet")))
        te1 = CLIPTextModel(CLIPTextConfig.from_pretrained(str(arch / "text_encoder")))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(str(arch / "text_encoder_2")))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(unet) == 2_567_463_684
    assert count(te1) == 123_060_480 and count(te2) == 694_659_840
    assert unet.add_embedding.linear_1.in_features == 2816


# ---- conditioning -------------------------------------------------------------------------------


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_text_conditioning_is_diffusers_pipeline_encode_prompt(tiny_sdxl, clip_skip):
    family = SDXLFamily()
    parts = family.load(ModelSource(str(tiny_sdxl[0])))
    captions = ["a photo of a red circle", "blue"]
    ours = family.encode_prompts(parts, captions, clip_skip)
    with torch.no_grad():
        embeds, _, pooled, _ = family.pipeline(parts).encode_prompt(
            captions, device="cpu", do_classifier_free_guidance=False,
            clip_skip=clip_skip - 1 if clip_skip > 1 else None)
    assert ours["encoder_hidden_states"].shape == (2, 77, 32 + 64) and ours["text_embeds"].shape == (2, 64)
    assert torch.equal(ours["encoder_hidden_states"], embeds) and torch.equal(ours["text_embeds"], pooled)


def test_add_time_ids_from_given_sizes():
    latents = torch.zeros(2, 4, 12, 16)  # trained at 96 x 128 (h x w)
    ids = add_time_ids(torch.tensor([[1024, 768], [300, 500]]), torch.tensor([[0, 32], [7, 0]]),
                       torch.tensor([[96, 128], [96, 128]]), latents=latents)
    assert ids.dtype == torch.float32
    assert ids.tolist() == [[1024, 768, 0, 32, 96, 128], [300, 500, 7, 0, 96, 128]]
    assert add_time_ids(latents=latents).tolist() == [[96, 128, 0, 0, 96, 128]] * 2  # none given
    assert add_time_ids([(512, 512)], None, None, latents=latents[:1]).tolist() == [[512, 512, 0, 0, 96, 128]]
    with pytest.raises(ValueError, match="for 1 examples, batch has 2"):
        add_time_ids([(512, 512)], latents=latents)


def test_size_conditioning_reaches_the_unet_like_diffusers(tiny_sdxl):
    """conditioning_for_batch + predict give the U-Net exactly the time_ids diffusers' pipeline builds."""
    family = SDXLFamily()
    parts = family.load(ModelSource(str(tiny_sdxl[0])))
    text = family.encode_prompts(parts, ["a red dog"], 1)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    batch = {"original_size": torch.tensor([[100, 200]]), "crop_top_left": torch.tensor([[3, 5]]),
             "target_size": torch.tensor([[64, 64]])}
    conditioning = family.conditioning_for_batch(parts, batch, text, latents)
    pipe = family.pipeline(parts)
    expected = pipe._get_add_time_ids((100, 200), (3, 5), (64, 64), torch.float32,
                                      text_encoder_projection_dim=parts.text_encoders["te2"].config.projection_dim)
    assert torch.equal(conditioning["time_ids"], expected)
    with torch.no_grad():
        ours = family.predict(parts, latents, torch.tensor([300]), conditioning)
        plain = family.predict(parts, latents, torch.tensor([300]), text)  # no sizes: 64x64, no crop
    assert not torch.allclose(ours, plain)


def test_fp16_vae_warns(tiny_sdxl, capsys):
    from library.families import sdxl

    family = SDXLFamily()
    parts = family.load(ModelSource(str(tiny_sdxl[0])))
    parts.vae.to(torch.float16)
    sdxl._WARNED.discard("fp16_vae")
    family.encode_images(parts, torch.zeros(1, 3, 64, 64))
    assert "the SDXL VAE is running in fp16" in capsys.readouterr().err


# ---- training -----------------------------------------------------------------------------------


def test_golden_losses_lora(sdxl_config):
    result = train_network(sdxl_config())
    assert close(result.losses, GOLDEN_SDXL)
    assert {c.target.kohya_prefix for c in result.adapted} == {"lora_unet", "lora_te1", "lora_te2"}
    keys = load_file(result.adapter_path).keys()
    names = {k.split(".", 1)[0] for k in keys}
    for name in ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k",
                 "lora_unet_mid_block_attentions_0_transformer_blocks_1_ff_net_2",
                 "lora_te1_text_model_encoder_layers_2_self_attn_out_proj",
                 "lora_te2_text_model_encoder_layers_0_mlp_fc1"):
        assert name in names
    assert not any("text_projection" in n for n in names)


def test_golden_losses_notice_size_conditioning(sdxl_config, monkeypatch):
    from library.families import sdxl

    original = sdxl.add_time_ids
    monkeypatch.setattr(sdxl, "add_time_ids", lambda *a, **k: original(**k) + 8)
    assert not close(train_network(sdxl_config()).losses, GOLDEN_SDXL)


def test_golden_losses_full_fine_tune_fused_adafactor(sdxl_config, tiny_sdxl):
    result = train_db(sdxl_config(optimizer={"optimizer_type": "Adafactor", "fused_backward_pass": True,
                                             "learning_rate": 1e-4, "max_grad_norm": 0.0},
                                  train={"max_train_steps": 4}))
    assert close(result.losses, GOLDEN_SDXL_DB)
    # the SAI single file reloads (through diffusers' from_single_file) to the trained weights
    folder = tiny_sdxl[0]
    reloaded = SDXLFamily().load(ModelSource(str(result.model_path), arch=str(folder), tokenizer=str(folder)))
    assert_same_weights(result.parts, reloaded)
    base = part_states(SDXLFamily().load(ModelSource(str(folder))))
    assert any(not torch.equal(v, base["te2"][k]) for k, v in result.parts.text_encoders["te2"].state_dict().items())


@pytest.mark.parametrize("asked", [False, True])
def test_sd_scripts_config_trains_the_text_encoders_as_sdxl_train(tiny_sdxl, tiny_data, tmp_path, capsys, asked):
    """A flat sd-scripts config (no key telling its script) on an SDXL model: sdxl_train trains the text
    encoders only with train_text_encoder = true; the resolved config records what the run did."""
    from library.config_files import config_from_dict

    flat = {"pretrained_model_name_or_path": str(tiny_sdxl[0]), "train_data_dir": str(tiny_data),
            "output_dir": str(tmp_path / "out"), "output_name": "db", "resolution": 64, "train_batch_size": 2,
            "max_train_steps": 2, "seed": 7, "learning_rate": 1e-3, "optimizer_type": "AdamW",
            **({"train_text_encoder": True} if asked else {})}
    result = train_db(config_from_dict(flat, source="sdxl_train.toml"))
    base = part_states(SDXLFamily().load(ModelSource(str(tiny_sdxl[0]))))
    for name in ("te1", "te2"):
        changed = [k for k, v in result.parts.text_encoders[name].state_dict().items()
                   if not torch.equal(v, base[name][k])]
        assert bool(changed) is asked, name
    assert ("sdxl_train trains them only with train_text_encoder = true" in capsys.readouterr().out) is not asked
    resolved = (tmp_path / "out" / "db-config.toml").read_text()
    assert f"train_text_encoder = {str(asked).lower()}" in resolved


# ---- the LoRA file elsewhere --------------------------------------------------------------------


def _probe(family, parts):
    """Both text conditionings and the U-Net prediction for a fixed prompt, latent, timestep and sizes."""
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    batch = {"original_size": [(80, 96)], "crop_top_left": [(8, 0)], "target_size": [(64, 64)]}
    with torch.no_grad():
        text = family.encode_prompts(parts, ["a photo of a red circle"], 1)
        conditioning = family.conditioning_for_batch(parts, batch, text, latents)
        return (text["encoder_hidden_states"], text["text_embeds"],
                family.predict(parts, latents, torch.tensor([500]), conditioning))


def _pipe_parts(pipe):
    from library.families.base import Components

    return Components(denoiser=pipe.unet, vae=pipe.vae, noise_scheduler=pipe.scheduler,
                      text_encoders={"te1": pipe.text_encoder, "te2": pipe.text_encoder_2},
                      tokenizers={"te1": pipe.tokenizer, "te2": pipe.tokenizer_2})


def test_diffusers_loads_every_key_with_the_same_outputs_as_our_merge(sdxl_config, tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline
    from peft.tuners.lora import LoraLayer

    from networks.merge import merge_lora

    result = train_network(sdxl_config(network={"conv_dim": 2, "conv_alpha": 1.0}))
    path = str(result.adapter_path)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl[0]))
    pipe.load_lora_weights(path)
    layers_in_file = {k.split(".", 1)[0] for k in load_file(path)}
    consumed = {name: sum(isinstance(m, LoraLayer) for m in module.modules())
                for name, module in (("unet", pipe.unet), ("te1", pipe.text_encoder), ("te2", pipe.text_encoder_2))}
    prefixes = {"unet": "lora_unet_", "te1": "lora_te1_", "te2": "lora_te2_"}
    assert consumed == {name: sum(n.startswith(p) for n in layers_in_file) for name, p in prefixes.items()}
    assert sum(consumed.values()) == len(layers_in_file) and consumed["te2"] == 6 * 3

    family = SDXLFamily()
    merged = family.load(ModelSource(str(tiny_sdxl[0])))
    assert merge_lora({"denoiser": merged.denoiser, **merged.text_encoders}, family.adapter_targets(merged),
                      path) == len(layers_in_file)
    base = _probe(family, family.load(ModelSource(str(tiny_sdxl[0]))))
    ours, theirs, trained = _probe(family, merged), _probe(family, _pipe_parts(pipe)), _probe(family, result.parts)
    for o, t, p, b in zip(ours, theirs, trained, base):
        assert torch.allclose(o, t, atol=1e-5) and torch.allclose(o, p, atol=1e-5)
        assert (o - b).abs().max() > 1e-4  # the adapter changed something


def _sai_named(family, result, path, out):
    """The file with its U-Net keys renamed to the SAI names sd-scripts writes for SDXL."""
    unet = next(c for c in result.adapted if c.target.component == "denoiser")
    rename = {f"lora_unet_{p.replace('.', '_')}": "lora_unet_" + unet.target.kohya_names(p).replace(".", "_")
              for p in unet.layers}
    tensors = load_file(path)
    renamed = {rename.get(k.split(".", 1)[0], k.split(".", 1)[0]) + "." + k.split(".", 1)[1]: v
               for k, v in tensors.items()}
    save_file(renamed, str(out))
    return renamed


def test_sai_module_names():
    family = SDXLFamily()
    parts = type("P", (), {"denoiser": type("U", (), {"config": dict(_tiny_unet_config())})()})()
    for diffusers_path, sai in [
        ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
         "input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
        ("down_blocks.2.attentions.1.proj_out", "input_blocks.8.1.proj_out"),
        ("down_blocks.0.resnets.0.conv1", "input_blocks.1.0.in_layers.2"),
        ("down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection"),
        ("down_blocks.1.downsamplers.0.conv", "input_blocks.6.0.op"),
        ("mid_block.attentions.0.transformer_blocks.1.ff.net.2", "middle_block.1.transformer_blocks.1.ff.net.2"),
        ("mid_block.resnets.1.time_emb_proj", "middle_block.2.emb_layers.1"),
        ("up_blocks.0.attentions.2.proj_in", "output_blocks.2.1.proj_in"),
        ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
        ("up_blocks.2.resnets.2.conv2", "output_blocks.8.0.out_layers.3"),
    ]:
        assert family.sai_module_path(parts, diffusers_path) == sai


def _tiny_unet_config():
    from library.tiny import build_tiny_sdxl

    return build_tiny_sdxl()["unet"].config


def test_sai_named_file_is_the_same_adapter_in_diffusers(sdxl_config, tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    result = train_network(sdxl_config())
    family = SDXLFamily()
    renamed = _sai_named(family, result, result.adapter_path, tmp_path / "sai.safetensors")
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in renamed
    outputs = []
    for path in (result.adapter_path, tmp_path / "sai.safetensors"):
        pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl[0]))
        pipe.load_lora_weights(str(path))
        outputs.append(_probe(family, _pipe_parts(pipe)))
    for a, b in zip(*outputs):
        assert torch.equal(a, b)


def test_sai_named_file_loads_here(sdxl_config, tmp_path):
    from networks import files

    result = train_network(sdxl_config())
    _sai_named(SDXLFamily(), result, result.adapter_path, tmp_path / "sai.safetensors")
    assert files.load_into(result.adapted, str(tmp_path / "sai.safetensors")) == sum(len(c.layers)
                                                                                      for c in result.adapted)


def test_no_half_vae_keeps_the_vae_in_fp32(sdxl_config):
    result = train_network(sdxl_config(train={"mixed_precision": "bf16", "no_half_vae": True,
                                              "max_train_steps": 1}))
    assert result.parts.vae.dtype == torch.float32 and result.parts.denoiser.conv_in.weight.dtype == torch.bfloat16
    plain = train_network(sdxl_config(train={"mixed_precision": "bf16", "max_train_steps": 1,
                                             "output_name": "half"}))
    assert plain.parts.vae.dtype == torch.bfloat16


def test_cached_text_outputs_include_the_pooled_ones(sdxl_config):
    live = train_network(sdxl_config(network={"network_train_unet_only": True}))
    cached = train_network(sdxl_config(network={"network_train_unet_only": True},
                                       train={"cache_text_encoder_outputs": True, "output_name": "cached"}))
    assert close(cached.losses, live.losses) and not close(live.losses, GOLDEN_SDXL)
