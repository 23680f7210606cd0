"""SDXL diffusers -> SAI single-file layout, judged by diffusers' own converters (as test_ldm_layout.py
does for SD1/SD2): add_embedding <-> label_emb, transformer depth per level, the two text towers."""
import torch
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_open_clip_checkpoint

from library.ldm_layout import sdxl_pipeline_to_ldm, unet_to_ldm
from library.tiny import build_tiny_sdxl

U = "model.diffusion_model."


def test_unet_round_trip_through_diffusers_converter():
    unet = build_tiny_sdxl()["unet"]
    original = unet.state_dict()
    ldm = unet_to_ldm(original, dict(unet.config))
    assert ldm[U + "label_emb.0.0.weight"] is original["add_embedding.linear_1.weight"]
    assert ldm[U + "label_emb.0.2.bias"] is original["add_embedding.linear_2.bias"]
    # depth 2 on the last level and in the middle block, depth 1 on level 1; no attention on level 0
    assert U + "input_blocks.7.1.transformer_blocks.1.attn2.to_k.weight" in ldm
    assert U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight" in ldm
    assert U + "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight" not in ldm
    assert U + "middle_block.1.transformer_blocks.1.ff.net.2.weight" in ldm
    assert not any(k.startswith(U + "input_blocks.1.1.") for k in ldm)
    assert U + "output_blocks.2.2.conv.weight" in ldm and U + "output_blocks.5.2.conv.weight" in ldm
    converted = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert converted.keys() == original.keys()
    assert all(torch.equal(converted[k], v) for k, v in original.items())


def test_pipeline_keys_and_text_towers():
    parts = build_tiny_sdxl()
    te1, te2 = parts["text_encoder"], parts["text_encoder_2"]
    ldm = sdxl_pipeline_to_ldm(parts["unet"].state_dict(), dict(parts["unet"].config), parts["vae"].state_dict(),
                               te1.state_dict(), te2.state_dict())
    tops = {".".join(k.split(".")[:3]) if k.startswith("conditioner.") else k.split(".")[0] for k in ldm}
    assert tops == {"model", "first_stage_model", "conditioner.embedders.0", "conditioner.embedders.1"}
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.2.mlp.fc1.weight" in ldm
    g = "conditioner.embedders.1.model."
    assert torch.equal(ldm[g + "text_projection"], te2.text_projection.weight.T)
    assert ldm[g + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 64, 64)
    assert ldm[g + "positional_embedding"].shape == (77, 64)
    tower = {k: v for k, v in ldm.items() if k.startswith(g)}
    converted = convert_open_clip_checkpoint(te2, tower, prefix=g)
    expected = {k: v for k, v in te2.state_dict().items() if not k.endswith("position_ids")}
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[k], v) for k, v in expected.items())
