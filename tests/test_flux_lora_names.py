"""FLUX kohya files in sd-scripts' names (double_blocks_0_img_attn_qkv, single_blocks_0_linear1, ...), with q, k, v
(and the single blocks' MLP input) fused into one LoRA: the exact key set, save -> reload, diffusers'
FluxPipeline.load_lora_weights on a FLUX.1-width model, sd-scripts' shared-down layout, the module-path names
of older files, LoHa's per-part names, and merging a fused file into the weights."""
import copy
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import train_network
from library.families.base import Components, ModelSource
from library.families.flux import FluxFamily
from model_checks import inject_adapters
from networks import algorithms, files, lycoris_format
from networks.lycoris_format import LoraFileError
from networks.settings import settings_from

DOUBLE = ["img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2", "img_mod_lin",
          "txt_attn_qkv", "txt_attn_proj", "txt_mlp_0", "txt_mlp_2", "txt_mod_lin"]
SINGLE = ["linear1", "linear2", "modulation_lin"]
CLIP = ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2"]


def _settings(**extra):
    return settings_from({"module": "networks.lora", "dim": 4, "alpha": 2.0, **extra})


def _adapt(parts, settings, seed=None):
    """Adapters in the transformer and CLIP-L; with a seed, trained-looking weights (peft starts at zero delta)."""
    adapted = inject_adapters(FluxFamily(), parts, settings)
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in (p for c in adapted for p in c.parameters()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return adapted


def _output(parts, seed=3):
    family = FluxFamily()
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        text = family.encode_prompts(parts, ["a photo of a red circle"], 1)
        return family.predict(parts, latents, torch.tensor([400.0]), text)


def _load(tiny_flux):
    return FluxFamily().load(ModelSource(str(tiny_flux["folder"]), t5xxl_max_token_length=16))


def _params(adapted):
    return {(c.target.component, path, name): p.detach().clone() for c in adapted
            for path, layer in c.adapter_layers() for name, p in algorithms.parameters(layer).items()}


def _assert_same_params(a, b):
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for key in pa:
        assert torch.equal(pa[key], pb[key]), key


def test_trained_file_has_sd_scripts_names_and_reloads(flux_config, tiny_flux):
    result = train_network(flux_config(train={"max_train_steps": 2}))
    tensors = load_file(result.adapter_path)
    names = ([f"lora_unet_double_blocks_{i}_{n}" for i in range(2) for n in DOUBLE]
             + [f"lora_unet_single_blocks_{i}_{n}" for i in range(2) for n in SINGLE]
             + [f"lora_te1_text_model_encoder_layers_{i}_{n}" for i in range(2) for n in CLIP])
    assert set(tensors) == {f"{n}.{s}" for n in names for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    qkv, linear1 = "lora_unet_double_blocks_1_txt_attn_qkv", "lora_unet_single_blocks_0_linear1"
    assert tensors[f"{qkv}.lora_down.weight"].shape == (12, 32) and tensors[f"{qkv}.lora_up.weight"].shape == (96, 12)
    assert tensors[f"{linear1}.lora_down.weight"].shape == (16, 32)
    assert tensors[f"{linear1}.lora_up.weight"].shape == (224, 16)  # q, k, v 32 each + MLP 128
    assert float(tensors[f"{qkv}.alpha"]) == 6.0 and float(tensors[f"{linear1}.alpha"]) == 8.0  # alpha/rank = 2/4
    up = tensors[f"{linear1}.lora_up.weight"]
    assert up[:32, :4].abs().sum() > 0 and up[:32, 4:].abs().sum() == 0 and up[96:, :12].abs().sum() == 0
    assert float(tensors["lora_unet_double_blocks_0_img_mlp_0.alpha"]) == 2.0

    fresh = _load(tiny_flux)
    adapted = _adapt(fresh, _settings())
    assert files.load_into(adapted, str(result.adapter_path)) == sum(len(c.layers) for c in result.adapted) == 52
    _assert_same_params(adapted, result.adapted)
    assert torch.equal(_output(fresh), _output(result.parts))


def _wide_flux_pipeline():
    """FLUX.1's width (3072: diffusers' converter assumes linear1 = 3 x 3072 + 12288) with one block of each
    kind, around the tiny text encoders and VAE."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from library.tiny import build_tiny_flux

    parts = build_tiny_flux()
    torch.manual_seed(0)
    parts["transformer"] = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=48, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56))
    return FluxPipeline(**parts)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_diffusers_loads_every_key_with_our_outputs(tmp_path):
    from peft.tuners.lora import LoraLayer

    pipe = _wide_flux_pipeline()
    ours = Components(denoiser=copy.deepcopy(pipe.transformer), vae=pipe.vae, noise_scheduler=pipe.scheduler,
                      text_encoders={"te1": copy.deepcopy(pipe.text_encoder), "te3": pipe.text_encoder_2},
                      tokenizers={"te1": pipe.tokenizer, "te3": pipe.tokenizer_2})
    adapted = _adapt(ours, _settings(), seed=1)
    path = tmp_path / "wide.safetensors"
    save_file(lycoris_format.state_dict(adapted), str(path))
    assert {k.split(".")[0] for k in load_file(path) if "_blocks_0_" in k and "unet" in k} == {
        *(f"lora_unet_double_blocks_0_{n}" for n in DOUBLE), *(f"lora_unet_single_blocks_0_{n}" for n in SINGLE)}

    records = _Records()
    logging.getLogger("diffusers").addHandler(records)
    try:
        pipe.load_lora_weights(str(path))
    finally:
        logging.getLogger("diffusers").removeHandler(records)
    assert not records.messages  # "Unsupported keys ..." and peft's unexpected keys are warnings
    theirs = Components(denoiser=pipe.transformer, vae=pipe.vae, noise_scheduler=pipe.scheduler,
                        text_encoders={"te1": pipe.text_encoder, "te3": pipe.text_encoder_2},
                        tokenizers={"te1": pipe.tokenizer, "te3": pipe.tokenizer_2})
    consumed = sum(isinstance(m, LoraLayer) for mod in (pipe.transformer, pipe.text_encoder) for m in mod.modules())
    assert consumed == sum(len(c.layers) for c in adapted) == 20 + 12
    mlp_in = pipe.transformer.single_transformer_blocks[0].proj_mlp  # block-diagonal seen: rank-4 parts
    shapes = [tuple(m.weight.shape) for m in (*mlp_in.lora_A.values(), *mlp_in.lora_B.values())]
    assert shapes == [(4, 3072), (12288, 4)]
    expected, found = _output(ours), _output(theirs)
    torch.testing.assert_close(found, expected, atol=1e-5, rtol=1e-4)
    pipe.transformer.disable_lora()
    assert (expected - _output(theirs)).abs().max() > 1e-2  # the transformer's LoRA matters


def _shared_down(tensors, name, rank, generator):
    """sd-scripts' default qkv layout: one down (rank, in) for all parts, up (sum of outs, rank)."""
    down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
    tensors[f"{name}.lora_down.weight"] = torch.randn(rank, down.shape[1], generator=generator)
    tensors[f"{name}.lora_up.weight"] = torch.randn(up.shape[0], rank, generator=generator)
    tensors[f"{name}.alpha"] = torch.tensor(2.0)


def test_sd_scripts_shared_down_file_loads_exactly(tiny_flux, tmp_path):
    from networks.merge import merge_lora

    parts = _load(tiny_flux)
    adapted = _adapt(parts, _settings(), seed=2)
    tensors = lycoris_format.state_dict(adapted)
    g = torch.Generator().manual_seed(5)
    for name in ("lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_1_linear1"):
        _shared_down(tensors, name, 4, g)
    path = tmp_path / "sd-scripts.safetensors"
    save_file(tensors, str(path))

    fresh = _load(tiny_flux)
    loaded = _adapt(fresh, _settings())
    assert files.load_into(loaded, str(path)) == 52
    layers = dict(loaded[0].adapter_layers())
    down, up = tensors["lora_unet_single_blocks_1_linear1.lora_down.weight"], tensors[
        "lora_unet_single_blocks_1_linear1.lora_up.weight"]
    for i, part in enumerate(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")):
        params = algorithms.parameters(layers[f"single_transformer_blocks.1.{part}"])
        assert torch.equal(params["lora_A.weight"], down)
        assert torch.equal(params["lora_B.weight"], up[32 * i:32 * (i + 1)] if i < 3 else up[96:])
    merged = _load(tiny_flux)
    targets = FluxFamily().adapter_targets(merged)
    assert merge_lora({"denoiser": merged.denoiser, **merged.text_encoders}, targets, str(path)) == 26 + 12
    torch.testing.assert_close(_output(merged), _output(fresh), atol=1e-5, rtol=1e-4)


def test_merge_of_our_fused_file_equals_the_adapter(tiny_flux, tmp_path):
    from networks.merge import merge_lora

    parts = _load(tiny_flux)
    adapted = _adapt(parts, _settings(), seed=3)
    save_file(lycoris_format.state_dict(adapted), str(tmp_path / "ours.safetensors"))
    merged = _load(tiny_flux)
    targets = FluxFamily().adapter_targets(merged)
    merge_lora({"denoiser": merged.denoiser, **merged.text_encoders}, targets, str(tmp_path / "ours.safetensors"))
    assert (_output(merged) - _output(_load(tiny_flux))).abs().max() > 1e-2
    torch.testing.assert_close(_output(merged), _output(parts), atol=1e-5, rtol=1e-4)


def test_files_with_module_path_names_still_load(tiny_flux, tmp_path):
    """Files written before the BFL names: lora_unet_transformer_blocks_0_attn_to_q, ..."""
    adapted = _adapt(_load(tiny_flux), _settings(), seed=4)
    old = {}
    for c in adapted:
        for path, layer in c.adapter_layers():
            name = lycoris_format.kohya_name(c.target, path)
            old.update({f"{name}.{s}": t.detach() for s, t in algorithms.file_tensors(c.algo, layer).items()})
            old[f"{name}.alpha"] = torch.tensor(2.0)
    assert "lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight" in old
    save_file(old, str(tmp_path / "old.safetensors"))
    fresh = _adapt(_load(tiny_flux), _settings())
    assert files.load_into(fresh, str(tmp_path / "old.safetensors")) == 52
    _assert_same_params(fresh, adapted)


def test_loha_parts_keep_their_own_names_and_reload(tiny_flux, tmp_path):
    settings = _settings(algo="loha")
    adapted = _adapt(_load(tiny_flux), settings, seed=6)
    tensors = lycoris_format.state_dict(adapted)
    names = {k.split(".")[0] for k in tensors}
    assert "lora_transformer_transformer_blocks_0_attn_to_q" in names  # ComfyUI maps it onto the qkv slice
    assert "lora_transformer_single_transformer_blocks_1_proj_mlp" in names
    assert "lora_unet_double_blocks_0_img_attn_proj" in names and "lora_unet_single_blocks_0_linear2" in names
    assert not any(n.endswith(("_qkv", "_linear1")) for n in names)
    save_file(tensors, str(tmp_path / "loha.safetensors"))
    fresh = _adapt(_load(tiny_flux), settings)
    assert files.load_into(fresh, str(tmp_path / "loha.safetensors")) == 52
    _assert_same_params(fresh, adapted)


def test_a_fused_layer_that_is_no_lora_of_the_parts_is_refused(tiny_flux, tmp_path):
    adapted = _adapt(_load(tiny_flux), _settings(), seed=7)
    tensors = lycoris_format.state_dict(adapted)
    tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"][0, 11] = 1.0  # off the block diagonal
    save_file(tensors, str(tmp_path / "dense.safetensors"))
    fresh = _adapt(_load(tiny_flux), _settings())
    before = _params(fresh)
    with pytest.raises(LoraFileError, match="double_blocks_0_img_attn_qkv.*rank 12"):
        files.load_into(fresh, str(tmp_path / "dense.safetensors"))
    assert all(torch.equal(before[k], v) for k, v in _params(fresh).items())  # nothing half-loaded


def test_kohya_layout_of_the_flux_transformer():
    from library.flux_layout import kohya_layout

    assert kohya_layout("transformer_blocks.3.attn.to_k") == ("double_blocks.3.img_attn.qkv", 1, 3)
    assert kohya_layout("transformer_blocks.0.attn.add_v_proj") == ("double_blocks.0.txt_attn.qkv", 2, 3)
    assert kohya_layout("single_transformer_blocks.7.proj_mlp") == ("single_blocks.7.linear1", 3, 4)
    assert kohya_layout("single_transformer_blocks.7.proj_out") == ("single_blocks.7.linear2", 0, 1)
    assert kohya_layout("transformer_blocks.1.norm1_context.linear") == ("double_blocks.1.txt_mod.lin", 0, 1)
    assert kohya_layout("transformer_blocks.1.ff_context.net.2") == ("double_blocks.1.txt_mlp.2", 0, 1)
    assert kohya_layout("x_embedder") == ("img_in", 0, 1) and kohya_layout("pos_embed") is None


def test_a_group_not_all_adapted_is_written_per_part(tiny_flux):
    from networks.targets import AdaptedComponent

    unet = _adapt(_load(tiny_flux), _settings(), seed=8)[0]
    partial = AdaptedComponent(unet.target, unet.module, {p: r for p, r in unet.layers.items()
                                                          if p != "transformer_blocks.0.attn.to_v"}, unet.algo)
    names = {k.split(".")[0] for k in lycoris_format.state_dict([partial])}
    assert {"lora_transformer_transformer_blocks_0_attn_to_q", "lora_transformer_transformer_blocks_0_attn_to_k",
            "lora_unet_double_blocks_0_txt_attn_qkv", "lora_unet_double_blocks_1_img_attn_qkv"} <= names
    assert "lora_unet_double_blocks_0_img_attn_qkv" not in names


@pytest.mark.parametrize("args, double, single, written", [
    ({}, "all", "all", {}),
    ({"train_blocks": "single"}, set(), "all", {"train_blocks": "single"}),
    ({"train_blocks": "double"}, "all", set(), {"train_blocks": "double"}),
    ({"train_double_block_indices": "0", "train_single_block_indices": "none"}, {0}, set(),
     {"train_double_block_indices": "0", "train_single_block_indices": "none"}),
    ({"train_double_block_indices": "all", "train_single_block_indices": "1-1"}, "all", {1},
     {"train_single_block_indices": "1"}),
    ({"train_blocks": "double", "train_double_block_indices": "0-0,1"}, {0, 1}, set(),
     {"train_blocks": "double", "train_double_block_indices": "0,1"}),
])
def test_flux_block_selection_as_lora_flux(tiny_flux, args, double, single, written):
    """sd-scripts' lora_flux network_args: train_blocks (all, double, single) and the indices of each kind
    ("all", "none", "0-0,1"): adapters only in the chosen blocks (found by their kohya names double_blocks.N /
    single_blocks.N), whole blocks, and ss_network_args saying so."""
    from networks.targets import find_layers

    flux_parts = _load(tiny_flux)
    target = FluxFamily().adapter_targets(flux_parts)[0]
    layers = find_layers(flux_parts.denoiser, target, _settings(**args))
    everything = find_layers(flux_parts.denoiser, target, _settings())
    blocks = {kind: {int(p.split(".")[1]) for p in layers if p.startswith(prefix)}
              for kind, prefix in (("double", "transformer_blocks."), ("single", "single_transformer_blocks."))}
    totals = {"double": len(flux_parts.denoiser.transformer_blocks),
              "single": len(flux_parts.denoiser.single_transformer_blocks)}
    assert totals == {"double": 2, "single": 2}
    expected = {"double": double, "single": single}
    assert blocks == {k: set(range(totals[k])) if v == "all" else v for k, v in expected.items()}
    kept = {p for p in everything if not p.startswith(("transformer_blocks.", "single_transformer_blocks."))
            or int(p.split(".")[1]) in blocks["double" if p.startswith("transformer_") else "single"]}
    assert set(layers) == kept  # whole blocks, every layer of a chosen block
    assert {k: v for k, v in _settings(**args).as_args().items() if "block" in k} == written


def test_flux_block_selection_errors():
    from networks.settings import SettingsError

    with pytest.raises(SettingsError, match="train_blocks"):
        _settings(train_blocks="middle")
    with pytest.raises(SettingsError, match="'train_double_block_indices' = '3-1'"):
        _settings(train_double_block_indices="3-1")
