"""diffusers -> LDM single-file layout, judged by diffusers' own LDM -> diffusers loaders.

Tiny random models of the real SD1 / SD2 architectures are converted with
``library.ldm_layout`` and loaded back with ``from_single_file`` and the
``single_file_utils`` converters; every tensor must come back bitwise equal and
no key may be dropped on the way.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    create_diffusers_clip_model_from_ldm,
)
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from library.ldm_layout import (
    clip_to_ldm,
    open_clip_to_ldm,
    pipeline_to_ldm,
    unet_to_ldm,
    vae_to_ldm,
)

U = "model.diffusion_model."
V = "first_stage_model."

UNET_CONFIGS = {
    # SD1-like: conv proj_in/out, trailing DownBlock2D / leading UpBlock2D.
    "sd1": dict(
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
        norm_num_groups=8,
    ),
    # SD2-like: linear proj_in/out, per-level head dims, three levels.
    "sd2": dict(
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        norm_num_groups=16,
    ),
}


def make_unet(kind: str) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, cross_attention_dim=32, **UNET_CONFIGS[kind])


def make_vae() -> AutoencoderKL:
    torch.manual_seed(1)
    return AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=16,
    )


def make_text_encoder() -> CLIPTextModel:
    torch.manual_seed(2)
    config = CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=1000,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    return CLIPTextModel(config)


def assert_same(actual: dict, expected: dict) -> None:
    """Equal key sets and bitwise-equal tensors (same dtype and shape)."""
    missing, extra = sorted(expected.keys() - actual.keys()), sorted(actual.keys() - expected.keys())
    assert not missing and not extra, f"dropped by round trip: {missing}; unexpected: {extra}"
    for key, tensor in expected.items():
        got = actual[key]
        assert got.device.type != "meta", f"{key} was never loaded"
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, key
        assert torch.equal(got, tensor), key


def save_model_config(model, root, subfolder: str) -> None:
    """Write ``root/subfolder/config.json`` as in a diffusers pipeline folder."""
    if isinstance(model, CLIPTextModel):
        model.config.save_pretrained(root / subfolder)
    else:
        model.save_config(root / subfolder)


def top_prefix(key: str) -> str:
    """``model.diffusion_model`` / ``first_stage_model`` / ``cond_stage_model.<x>``."""
    return ".".join(key.split(".")[: 1 if key.startswith("first_stage_model.") else 2])


# --------------------------------------------------------------------------- UNet


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_unet_round_trip(kind, tmp_path):
    unet = make_unet(kind)
    original = unet.state_dict()
    ldm = unet_to_ldm(original, dict(unet.config))

    assert {k.split(".")[2] for k in ldm} == {"time_embed", "input_blocks", "middle_block", "output_blocks", "out"}
    assert all(k.startswith(U) for k in ldm)
    # diffusers' key converter: nothing dropped, nothing altered.
    assert_same(convert_ldm_unet_checkpoint(ldm, dict(unet.config)), original)

    # diffusers' full single-file loader, from a dict and from a .safetensors file.
    save_model_config(unet, tmp_path, "unet")
    save_file(ldm, tmp_path / "unet.safetensors")
    for source in (ldm, str(tmp_path / "unet.safetensors")):
        loaded = UNet2DConditionModel.from_single_file(
            source, config=str(tmp_path), subfolder="unet", local_files_only=True
        )
        assert_same(loaded.state_dict(), original)


def test_unet_sd1_known_keys():
    unet = make_unet("sd1")
    sd = unet.state_dict()
    ldm = unet_to_ldm(sd, dict(unet.config))
    expected = {
        "input_blocks.0.0.weight": "conv_in.weight",
        "time_embed.2.bias": "time_embedding.linear_2.bias",
        "input_blocks.1.0.in_layers.0.weight": "down_blocks.0.resnets.0.norm1.weight",
        "input_blocks.1.0.emb_layers.1.weight": "down_blocks.0.resnets.0.time_emb_proj.weight",
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
        ),
        "input_blocks.2.1.proj_out.weight": "down_blocks.0.attentions.1.proj_out.weight",
        "input_blocks.3.0.op.weight": "down_blocks.0.downsamplers.0.conv.weight",
        "input_blocks.4.0.skip_connection.weight": "down_blocks.1.resnets.0.conv_shortcut.weight",
        "input_blocks.5.0.out_layers.3.weight": "down_blocks.1.resnets.1.conv2.weight",
        "middle_block.0.in_layers.2.weight": "mid_block.resnets.0.conv1.weight",
        "middle_block.1.proj_in.weight": "mid_block.attentions.0.proj_in.weight",
        "middle_block.2.out_layers.0.bias": "mid_block.resnets.1.norm2.bias",
        "output_blocks.2.0.skip_connection.weight": "up_blocks.0.resnets.2.conv_shortcut.weight",
        "output_blocks.2.1.conv.weight": "up_blocks.0.upsamplers.0.conv.weight",
        "output_blocks.5.1.transformer_blocks.0.attn2.to_k.weight": (
            "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k.weight"
        ),
        "out.0.weight": "conv_norm_out.weight",
        "out.2.bias": "conv_out.bias",
    }
    for ldm_key, diffusers_key in expected.items():
        assert ldm[U + ldm_key] is sd[diffusers_key], ldm_key
    assert ldm[U + "middle_block.1.proj_in.weight"].ndim == 4  # SD1: 1x1 conv
    assert len(ldm) == len(sd)
    # The tiny config has no level-2 blocks and no upsampler after the last level.
    assert not any(k.startswith(U + "input_blocks.6.") or k.startswith(U + "output_blocks.6.") for k in ldm)
    assert not any(k.startswith(U + "output_blocks.5.2.") for k in ldm)


def test_unet_sd2_upsampler_slots():
    unet = make_unet("sd2")
    ldm = unet_to_ldm(unet.state_dict(), dict(unet.config))
    assert U + "output_blocks.1.1.conv.weight" in ldm  # after UpBlock2D (no attention)
    assert U + "output_blocks.3.2.conv.weight" in ldm  # after CrossAttnUpBlock2D
    assert ldm[U + "middle_block.1.proj_in.weight"].ndim == 2  # SD2: Linear


# diffusers' loaders rename with str.replace, so a diffusers-only name left in an
# LDM key can survive their round trip; UIs would not find it. Ban them outright.
DIFFUSERS_ONLY_NAMES = {
    "down_blocks", "up_blocks", "mid_block", "resnets", "attentions", "downsamplers", "upsamplers",
    "conv_shortcut", "time_emb_proj", "time_embedding", "conv_norm_out", "group_norm",
}


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_no_diffusers_names_left(kind):
    unet = make_unet(kind)
    ldm = {**unet_to_ldm(unet.state_dict(), dict(unet.config)), **vae_to_ldm(make_vae().state_dict())}
    for key in ldm:
        names = set(key.split("."))
        assert not DIFFUSERS_ONLY_NAMES & names, key
        if key.startswith(U) and "transformer_blocks" not in names:  # UNet resnet leaves
            assert not {"norm1", "norm2", "conv1", "conv2"} & names, key
        if key.startswith(V):  # VAE attention leaves
            assert not {"to_q", "to_k", "to_v", "to_out"} & names, key


def test_unet_unknown_key_raises():
    unet = make_unet("sd1")
    sd = dict(unet.state_dict(), **{"add_embedding.linear_1.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="add_embedding"):
        unet_to_ldm(sd, dict(unet.config))


# --------------------------------------------------------------------------- VAE


def test_vae_round_trip(tmp_path):
    vae = make_vae()
    original = vae.state_dict()
    ldm = vae_to_ldm(original)

    assert {k.split(".")[1] for k in ldm} == {"encoder", "decoder", "quant_conv", "post_quant_conv"}
    assert_same(convert_ldm_vae_checkpoint(ldm, dict(vae.config)), original)

    save_model_config(vae, tmp_path, "vae")
    save_file(ldm, tmp_path / "vae.safetensors")
    for source in (ldm, str(tmp_path / "vae.safetensors")):
        loaded = AutoencoderKL.from_single_file(source, config=str(tmp_path), subfolder="vae", local_files_only=True)
        assert_same(loaded.state_dict(), original)


def test_vae_known_keys():
    vae = make_vae()
    sd = vae.state_dict()
    ldm = vae_to_ldm(sd)
    for coder in ("encoder", "decoder"):
        for name in ("q", "k", "v", "proj_out"):
            weight = ldm[f"{V}{coder}.mid.attn_1.{name}.weight"]
            assert weight.shape == (64, 64, 1, 1)
        assert f"{V}{coder}.mid.attn_1.norm.weight" in ldm
        assert f"{V}{coder}.mid.block_2.conv2.weight" in ldm
        assert f"{V}{coder}.norm_out.bias" in ldm
    assert torch.equal(
        ldm[V + "encoder.mid.attn_1.q.weight"][:, :, 0, 0], sd["encoder.mid_block.attentions.0.to_q.weight"]
    )
    expected = {
        "encoder.down.0.downsample.conv.weight": "encoder.down_blocks.0.downsamplers.0.conv.weight",
        "encoder.down.1.block.0.nin_shortcut.weight": "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
        # The LDM decoder numbers levels in reverse: diffusers up_blocks.0 is up.1.
        "decoder.up.1.upsample.conv.weight": "decoder.up_blocks.0.upsamplers.0.conv.weight",
        "decoder.up.0.block.0.nin_shortcut.weight": "decoder.up_blocks.1.resnets.0.conv_shortcut.weight",
    }
    for ldm_key, diffusers_key in expected.items():
        assert ldm[V + ldm_key] is sd[diffusers_key], ldm_key
    assert len(ldm) == len(sd)


# --------------------------------------------------------------------------- text encoders


def with_text_model_prefix(state_dict: dict) -> dict:
    """Original weights under the ``text_model.*`` names diffusers' converters emit."""
    return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in state_dict.items()}


def test_clip_round_trip(tmp_path):
    te = make_text_encoder()
    original = te.state_dict()
    ldm = clip_to_ldm(original)

    assert all(k.startswith("cond_stage_model.transformer.text_model.") for k in ldm)
    key = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    assert ldm[key] is original["encoder.layers.0.self_attn.q_proj.weight"]
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in ldm
    assert_same(convert_ldm_clip_checkpoint(ldm), with_text_model_prefix(original))

    # position_ids (a buffer some state dicts still carry) is dropped.
    with_ids = dict(original, **{"embeddings.position_ids": torch.arange(77)[None]})
    assert clip_to_ldm(with_ids).keys() == ldm.keys()

    save_model_config(te, tmp_path, "text_encoder")
    loaded = create_diffusers_clip_model_from_ldm(
        CLIPTextModel, ldm, config=str(tmp_path), subfolder="text_encoder", local_files_only=True
    )
    assert_same(loaded.state_dict(), original)


def test_open_clip_round_trip(tmp_path):
    te = make_text_encoder()
    original = te.state_dict()
    ldm = open_clip_to_ldm(original)

    p = "cond_stage_model.model."
    assert {k[len(p):].split(".")[0] for k in ldm} == {
        "token_embedding",
        "positional_embedding",
        "transformer",
        "ln_final",
    }
    for i in range(2):
        block = f"{p}transformer.resblocks.{i}."
        fused = ldm[block + "attn.in_proj_weight"]
        assert fused.shape == (96, 32)
        assert torch.equal(fused[32:64], original[f"encoder.layers.{i}.self_attn.k_proj.weight"])
        assert ldm[block + "attn.in_proj_bias"].shape == (96,)
        for name in ("ln_1", "ln_2", "mlp.c_fc", "mlp.c_proj", "attn.out_proj"):
            assert block + name + ".weight" in ldm
    assert ldm[p + "positional_embedding"] is original["embeddings.position_embedding.weight"]

    assert_same(convert_open_clip_checkpoint(te, ldm), with_text_model_prefix(original))

    save_model_config(te, tmp_path, "text_encoder")
    loaded = create_diffusers_clip_model_from_ldm(
        CLIPTextModel, ldm, config=str(tmp_path), subfolder="text_encoder", local_files_only=True
    )
    assert_same(loaded.state_dict(), original)


def test_open_clip_text_projection():
    """``CLIPTextModelWithProjection`` -> LDM ``text_projection`` ([hidden, proj], i.e. transposed).

    diffusers ignores ``cond_stage_model.model.text_projection`` when loading SD2
    files, so only the layout is checked here.
    """
    torch.manual_seed(3)
    config = make_text_encoder().config
    config.projection_dim = 16
    te = CLIPTextModelWithProjection(config)
    original = te.state_dict()
    ldm = open_clip_to_ldm(original)
    assert torch.equal(ldm["cond_stage_model.model.text_projection"], original["text_projection.weight"].T)
    assert ldm["cond_stage_model.model.text_projection"].shape == (32, 16)
    assert ldm.keys() - {"cond_stage_model.model.text_projection"} == open_clip_to_ldm(
        make_text_encoder().state_dict()
    ).keys()


def test_nested_text_model_keys_accepted():
    """State dicts from transformers < 5.6 (``text_model.*`` keys) give the same result."""
    original = make_text_encoder().state_dict()
    nested = with_text_model_prefix(original)
    assert clip_to_ldm(nested).keys() == clip_to_ldm(original).keys()
    assert open_clip_to_ldm(nested).keys() == open_clip_to_ldm(original).keys()


# --------------------------------------------------------------------------- pipeline


@pytest.mark.parametrize(("kind", "text_kind"), [("sd1", "clip"), ("sd2", "open_clip")])
def test_pipeline_single_file(kind, text_kind, tmp_path):
    unet, vae, te = make_unet(kind), make_vae(), make_text_encoder()
    ldm = pipeline_to_ldm(unet.state_dict(), dict(unet.config), vae.state_dict(), te.state_dict(), text_kind)

    text_prefix = {"clip": "cond_stage_model.transformer", "open_clip": "cond_stage_model.model"}[text_kind]
    assert {top_prefix(k) for k in ldm} == {"model.diffusion_model", "first_stage_model", text_prefix}

    for model, sub in ((unet, "unet"), (vae, "vae"), (te, "text_encoder")):
        save_model_config(model, tmp_path, sub)
    path = tmp_path / "model.safetensors"
    save_file(ldm, path)
    ckpt = load_file(path)

    kwargs = dict(config=str(tmp_path), local_files_only=True)
    loaded_unet = UNet2DConditionModel.from_single_file(str(path), subfolder="unet", **kwargs)
    assert_same(loaded_unet.state_dict(), unet.state_dict())
    loaded_vae = AutoencoderKL.from_single_file(str(path), subfolder="vae", **kwargs)
    assert_same(loaded_vae.state_dict(), vae.state_dict())
    loaded_te = create_diffusers_clip_model_from_ldm(CLIPTextModel, ckpt, subfolder="text_encoder", **kwargs)
    assert_same(loaded_te.state_dict(), te.state_dict())


def test_pipeline_rejects_unknown_text_encoder():
    with pytest.raises(ValueError, match="text_encoder_kind"):
        pipeline_to_ldm({}, UNET_CONFIGS["sd1"], {}, {}, "t5")
