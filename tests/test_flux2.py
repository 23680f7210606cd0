"""FLUX.2 on the tiny FLUX.2-klein-architecture model: the shipped architectures, the single-file layout against
diffusers' converter, loading (folder, and the BFL transformer file with separate text-encoder / ae files), the
text recipe and the transformer's inputs against diffusers' Flux2KleinPipeline, golden losses of adapter and full
fine-tune runs, an edit run whose loss follows its control images, the same losses with cached text outputs and
with block swap, the adapter in diffusers with every key consumed."""
import dataclasses

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import (FULL_FINE_TUNE, assert_cached_text_outputs_change_nothing, assert_model_file_refused,
                      assert_samples_reproducible, block_swapped_run, close, control_images, lora_layers,
                      pipeline_parts, predict_caption, split_files_source, train_db, train_network)
from goldens import GOLDEN_FLUX2, GOLDEN_FLUX2_DB
from library.families import get_family
from library.families.base import ModelSource
from library.families.flux import FluxFamily
from library.families.flux2 import Flux2Family
from library.loading import CheckpointError, arch_dir

# the runs of goldens.GOLDEN_FLUX2 (seed 7, dim 4, alpha 2, batch 2, lr 1e-3, 64px, transformer adapters, sd-scripts'
# FLUX defaults) on FLUX.2 dev (Mistral3 text, guidance 3.5: model.guidance_scale) and with control images
GOLDEN_FLUX2_DEV = [3.719114, 3.293840, 2.629239, 2.057453]
GOLDEN_FLUX2_EDIT = [3.542307, 3.190031, 2.471148, 1.952534]


def _single_file_source(files, **extra):
    return split_files_source(files, "text_encoder", "ae", **extra)


@pytest.mark.parametrize("arch, billions, text_width", [("flux2-klein-4b", 3.88, 7680), ("flux2-klein-9b", 9.08, 12288),
                                                     ("flux2-dev", 32.22, 15360)])
def test_shipped_configs_build_the_real_architectures(arch, billions, text_width):
    from diffusers import Flux2Transformer2DModel

    with torch.device("meta"):
        config = Flux2Transformer2DModel.load_config(str(arch_dir(arch) / "transformer"))
        model = Flux2Transformer2DModel.from_config(config)
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == billions  # "4B", "9B", "32B"
    assert model.config.joint_attention_dim == text_width and model.config.guidance_embeds == (arch == "flux2-dev")


def test_single_file_layout_is_the_inverse_of_diffusers_converter():
    """Ours -> file -> diffusers' converter gives back the same keys and shapes (klein 4B's width, meta device)."""
    from diffusers import Flux2Transformer2DModel

    from library.flux2_layout import file_to_transformer, transformer_to_file

    with torch.device("meta"):
        model = Flux2Transformer2DModel(num_layers=1, num_single_layers=1, num_attention_heads=24,
                                        joint_attention_dim=7680, guidance_embeds=True)
    state = model.state_dict()
    file = transformer_to_file(state)
    assert {"double_blocks.0.img_attn.qkv.weight", "double_blocks.0.txt_mlp.2.weight", "single_blocks.0.linear1.weight",
            "single_stream_modulation.lin.weight", "guidance_in.out_layer.weight", "txt_in.weight",
            "final_layer.adaLN_modulation.1.weight"} <= set(file)
    ours = file_to_transformer({"model.diffusion_model." + k: v for k, v in file.items()})
    assert set(ours) == set(state) and all(ours[k].shape == state[k].shape for k in state)


def test_final_modulation_order_round_trips(tiny_flux2):
    """The file's final adaLN is (shift, scale), diffusers' (scale, shift): real values survive both ways."""
    from library.flux2_layout import file_to_transformer, transformer_to_file

    state = Flux2Family().load(ModelSource(str(tiny_flux2["folder"]))).denoiser.state_dict()
    file = transformer_to_file(state)
    scale, shift = state["norm_out.linear.weight"].chunk(2)
    assert torch.equal(file["final_layer.adaLN_modulation.1.weight"], torch.cat([shift, scale]))
    back = file_to_transformer(dict(file))
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_single_files_and_folder_give_identical_models(tiny_flux2):
    assert get_family("auto", str(tiny_flux2["folder"])).name == "flux2"
    assert get_family("auto", str(tiny_flux2["transformer"])).name == "flux2"
    assert not FluxFamily().claims(str(tiny_flux2["transformer"]))  # FLUX.1's block names, not FLUX.1
    family = Flux2Family()
    a = family.load(ModelSource(str(tiny_flux2["folder"])))
    b = family.load(_single_file_source(tiny_flux2))
    for x, y in ((a.denoiser, b.denoiser), (a.vae, b.vae)):
        sa, sb = x.state_dict(), y.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.no_grad():
        assert torch.equal(family.encode_prompts(a, ["a red dog"], 1)["prompt_embeds"],
                           family.encode_prompts(b, ["a red dog"], 1)["prompt_embeds"])
    with pytest.raises(CheckpointError, match="model.text_encoder, model.ae"):
        family.load(ModelSource(str(tiny_flux2["transformer"])))


def test_the_tiny_command_builds_every_family():
    from library.families import registered
    from library.tiny import WHAT

    assert {f.name for f in registered()} <= set(WHAT)


def test_flux1_files_stay_with_flux1(tmp_path):
    from library.tiny import save_tiny_flux

    flux = save_tiny_flux(tmp_path / "tiny-flux", guidance=False)
    assert not Flux2Family().claims(str(flux["transformer"])) and not Flux2Family().claims(str(flux["folder"]))
    assert get_family("auto", str(flux["transformer"])).name == "flux"


def test_text_and_inputs_are_flux2_klein_pipeline(tiny_flux2):
    """encode_prompts = Flux2KleinPipeline.encode_prompt (Qwen3 chat turn, layers 9/18/27 stacked); encode_images =
    its patchify and batch-norm; predict() = the transformer called on its packed tokens and 4-axis ids, reference
    tokens after the image's with time 10, read from the image tokens."""
    from diffusers import Flux2KleinPipeline as P

    family = Flux2Family()
    parts = family.load(ModelSource(str(tiny_flux2["folder"])))
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    latents, reference = torch.randn(1, 128, 4, 4, generator=g), torch.randn(1, 128, 3, 5, generator=g)
    with torch.no_grad():
        text = family.encode_prompts(parts, ["a red dog", "blue"], 1)["prompt_embeds"]
        theirs, text_ids = family.pipeline(parts).encode_prompt(["a red dog", "blue"], device="cpu")
        assert text.shape == (2, 512, 48) and torch.equal(text, theirs)
        ours_latents = family.encode_images(parts, pixels, torch.Generator().manual_seed(1))
        raw = parts.vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(1))
        patches = P._patchify_latents(raw)
        std = torch.sqrt(parts.vae.bn.running_var.view(1, -1, 1, 1) + parts.vae.config.batch_norm_eps)
        assert torch.allclose(ours_latents, (patches - parts.vae.bn.running_mean.view(1, -1, 1, 1)) / std, atol=1e-6)
        ours = family.predict(parts, latents, torch.tensor([500.0]), {"prompt_embeds": text[:1],
                                                                      "control_latents": reference})
        plain = family.predict(parts, latents, torch.tensor([500.0]), {"prompt_embeds": text[:1]})
        out = parts.denoiser(hidden_states=torch.cat([P._pack_latents(latents), P._pack_latents(reference)], dim=1),
                             encoder_hidden_states=text[:1], timestep=torch.tensor([0.5]), guidance=None,
                             img_ids=torch.cat([P._prepare_latent_ids(latents), P._prepare_image_ids([reference])], 1),
                             txt_ids=text_ids[:1]).sample[:, :16]
    assert torch.allclose(ours, out.transpose(1, 2).reshape(1, 128, 4, 4), atol=1e-6)
    assert not torch.allclose(ours, plain)


def test_dev_text_and_guidance_are_flux2_pipeline(tiny_flux2_dev):
    """dev: Mistral3 (folder) and the language model alone (the single file) give Flux2Pipeline.encode_prompt's
    conditioning (BFL's system message, layers 10/20/30 stacked); the guidance input is model.guidance_scale."""
    family = Flux2Family()
    folder = family.load(ModelSource(str(tiny_flux2_dev["folder"]), guidance_scale=4.0))
    single = family.load(_single_file_source(tiny_flux2_dev, guidance_scale=2.0))
    assert type(folder.text_encoders["te"]).__name__ == "Mistral3ForConditionalGeneration"
    assert family.file_metadata(single)["modelspec.architecture"] == "flux-2-dev"
    latents = torch.randn(1, 128, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = family.encode_prompts(folder, ["a red dog", "blue"], 1)["prompt_embeds"]
        theirs = family.pipeline(folder).encode_prompt(["a red dog", "blue"], device="cpu")[0]
        assert torch.equal(ours, theirs) and torch.equal(ours, family.encode_prompts(single, ["a red dog", "blue"], 1)
                                                         ["prompt_embeds"])
        at_4, at_2 = (family.predict(p, latents, torch.tensor([500.0]), {"prompt_embeds": ours[:1]})
                      for p in (folder, single))
        guidance = torch.tensor([4.0])
        out = folder.denoiser(hidden_states=latents.flatten(2).transpose(1, 2), encoder_hidden_states=ours[:1],
                              timestep=torch.tensor([0.5]), guidance=guidance,
                              img_ids=family_ids(4, 4), txt_ids=family_text_ids(512)).sample
    assert torch.allclose(at_4, out.transpose(1, 2).reshape(1, 128, 4, 4), atol=1e-6)
    assert not torch.allclose(at_4, at_2)


def family_ids(h, w):
    from diffusers import Flux2Pipeline

    return Flux2Pipeline._prepare_latent_ids(torch.zeros(1, 1, h, w))


def family_text_ids(n):
    from diffusers import Flux2Pipeline

    return Flux2Pipeline._prepare_text_ids(torch.zeros(1, n, 1))


def test_golden_losses_dev_lora(make_config, tiny_flux2_dev):
    result = train_network(make_config(model={"pretrained_model_name_or_path": str(tiny_flux2_dev["folder"])}))
    assert close(result.losses, GOLDEN_FLUX2_DEV)


def test_golden_losses_lora(flux2_config):
    result = train_network(flux2_config())
    assert close(result.losses, GOLDEN_FLUX2)
    assert {c.target.kohya_prefix for c in result.adapted} == {"lora_unet"}
    names = {k.split(".", 1)[0] for k in load_file(result.adapter_path)}
    assert names == {f"lora_unet_double_blocks_{i}_{layer}" for i in (0, 1)
                     for layer in ("img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2", "txt_attn_qkv",
                                   "txt_attn_proj", "txt_mlp_0", "txt_mlp_2")} | {
        f"lora_unet_single_blocks_{i}_{layer}" for i in (0, 1) for layer in ("linear1", "linear2")}


def test_lora_keys_are_the_ones_comfyui_maps(flux2_config, tiny_flux2):
    """ComfyUI maps lora_unet_<name> onto diffusion_model.<name>.weight for every weight of its FLUX.2 model (BFL
    names, `model_lora_keys_unet`): every layer of our file names such a weight, and up @ down has its shape."""
    result = train_network(flux2_config(train={"max_train_steps": 1}))
    from library.flux2_layout import transformer_to_file

    base = Flux2Family().load(ModelSource(str(tiny_flux2["folder"]))).denoiser.state_dict()
    bfl = {k.removesuffix(".weight"): v.shape for k, v in transformer_to_file(base).items() if k.endswith(".weight")}
    comfy = {"lora_unet_" + name.replace(".", "_"): shape for name, shape in bfl.items()}
    tensors = load_file(result.adapter_path)
    layers = {k.split(".", 1)[0] for k in tensors}
    assert layers <= set(comfy) and len(layers) == 20
    for layer in layers:
        up, down = tensors[f"{layer}.lora_up.weight"], tensors[f"{layer}.lora_down.weight"]
        assert (up @ down).shape == comfy[layer], layer


def test_cached_text_outputs_give_the_same_losses(flux2_config):
    assert_cached_text_outputs_change_nothing(flux2_config)


def test_block_swap_gives_the_same_losses(flux2_config):
    assert block_swapped_run(flux2_config, 3).parts.denoiser._block_swapper.loads == 2 * 6


def test_golden_losses_full_fine_tune_and_single_file_reload(flux2_config, tiny_flux2):
    result = train_db(flux2_config(**FULL_FINE_TUNE))
    assert close(result.losses, GOLDEN_FLUX2_DB)
    reloaded = Flux2Family().load(_single_file_source({**tiny_flux2, "transformer": result.model_path}))
    trained, back = result.parts.denoiser.state_dict(), reloaded.denoiser.state_dict()
    assert trained.keys() == back.keys() and all(torch.equal(trained[k], back[k]) for k in trained)


def test_fp8_base_and_fp8_text_encoder_train(flux2_config):
    """fp8_base stores the transformer's block Linears in float8, t5xxl_precision = "fp8" the Qwen3 encoder's;
    both compute in bf16, and the run trains (finite losses, near the bf16 run's)."""
    bf16 = {"mixed_precision": "bf16", "max_train_steps": 2}
    plain = train_network(flux2_config(train=bf16))
    result = train_network(flux2_config(model={"t5xxl_precision": "fp8"}, train={**bf16, "fp8_base": True},
                                        save={"overwrite": True}))
    qkv = result.parts.denoiser.transformer_blocks[0].attn.to_q
    assert qkv.base_layer.weight.dtype == torch.float8_e4m3fn
    encoder = result.parts.text_encoders["te"]
    assert encoder.model.layers[0].mlp.up_proj.weight.dtype == torch.float8_e4m3fn
    assert encoder.model.embed_tokens.weight.dtype != torch.float8_e4m3fn
    assert all(abs(a - b) < 0.05 * b for a, b in zip(result.losses, plain.losses)) and result.losses != plain.losses


def test_edit_run_golden_losses_and_the_control_image_matters(flux2_config, tiny_data, tmp_path):
    def run(control):
        return train_network(flux2_config(dataset={"control_directory": str(control)}, save={"overwrite": True}))

    result = run(control_images(tiny_data, tmp_path / "control-a", 1))
    assert close(result.losses, GOLDEN_FLUX2_EDIT)
    other = run(control_images(tiny_data, tmp_path / "control-b", 2, flat=True))
    # the random tiny transformer mixes 16 reference tokens among 512 text and 16 image tokens weakly: other controls
    # move each loss by 3e-6 to 2e-5, 8 to 60 float32 steps of a loss near 3, where the same pairs repeat to 1e-7
    assert all(abs(a - b) > 2e-6 for a, b in zip(result.losses, other.losses))
    assert run(tmp_path / "control-a").losses == pytest.approx(result.losses, rel=1e-7)  # the same pairs


def test_adapter_in_diffusers_every_key_consumed(flux2_config, tiny_flux2):
    """The kohya file: Flux2KleinPipeline.load_lora_weights consumes every key (diffusers' Flux2 kohya converter
    leaves none), one LoRA layer per adapted module, with the outputs of our live adapter and of our merge."""
    from diffusers import Flux2KleinPipeline

    from networks.merge import merge_lora

    result = train_network(flux2_config(train={"max_train_steps": 2}))
    tensors = load_file(result.adapter_path)
    converted = Flux2KleinPipeline.lora_state_dict(str(result.adapter_path))
    converted = converted[0] if isinstance(converted, tuple) else converted
    modules = {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in converted}
    assert modules == {name for c in result.adapted for name in c.layers}
    assert len(converted) == 2 * len(modules) and not [k for k in tensors if "alpha" not in k and "lora_" not in k]
    pipe = Flux2KleinPipeline.from_pretrained(str(tiny_flux2["folder"]))
    pipe.load_lora_weights(str(result.adapter_path))
    assert lora_layers(pipe.transformer) == len(modules)
    family = Flux2Family()
    theirs = pipeline_parts(pipe, result.parts.source, {"te": pipe.text_encoder}, {"te": pipe.tokenizer})
    merged = family.load(ModelSource(str(tiny_flux2["folder"])))
    assert merge_lora({"denoiser": merged.denoiser}, family.adapter_targets(merged), str(result.adapter_path)) == 20
    latents = torch.randn(1, 128, 4, 4, generator=torch.Generator().manual_seed(3))
    outs = [predict_caption(family, parts, latents) for parts in (result.parts, theirs, merged)]
    assert torch.allclose(outs[0], outs[1], atol=1e-5) and torch.allclose(outs[2], outs[1], atol=1e-5)
    base = predict_caption(family, family.load(ModelSource(str(tiny_flux2["folder"]))), latents)
    assert not torch.allclose(outs[2], base, atol=1e-5)  # the adapter matters


def test_samples_are_reproducible_and_take_the_negative_prompt_and_a_reference(tiny_flux2, tmp_path):
    import numpy as np

    family = Flux2Family()
    parts = family.load(ModelSource(str(tiny_flux2["folder"])))
    reference = tmp_path / "ref.png"
    Image.fromarray((torch.rand(48, 80, 3, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
                    .numpy()).save(reference)

    def sample(negative, seed=5, control=None):
        return np.asarray(family.sample(parts, "a red dog", 64, 64, 2, seed, "euler", 1, negative, 4.0,
                                        control_image=control))

    first = assert_samples_reproducible(sample)
    assert not np.array_equal(first, sample("blurry", control=str(reference)))


@pytest.mark.parametrize("model, said", [
    ({}, "a FLUX.2 transformer file holds the transformer only; set model.text_encoder, model.ae to the separate "
         "files"),
    ({"family": "flux"}, "is a checkpoint of family \"flux2\" (from its tensor names), but 'model.family' = "
                         "\"flux\": set model.family = \"flux2\""),
])
def test_flux2_file_faults_exit_2_naming_the_key(model, said, tiny_flux2, config_error):
    assert_model_file_refused(config_error, tiny_flux2["transformer"], said, **model)


def test_planner_plans_flux2_with_its_text_encoder_in_fp8(tiny_flux2):
    """The planner builds FLUX.2 from its configs (the tiny folder's), encodes with the chat-rendering tokenizer
    stand-in, samples (the VAE decodes its own 32-channel latents), and t5xxl_precision = "fp8" halves the
    Qwen3 encoder's Linear weights while it encodes (bf16 -> fp8 for every Linear but lm_head)."""
    from library.config import NetworkSection
    from library.planner.plan import plan
    from library.planner.step import StepSettings

    base = StepSettings(recipe="network", family="flux2", arch=str(tiny_flux2["folder"]), width=64, height=64,
                        batch_size=2, mixed_precision="bf16", cache_latents=True, cache_text_encoder_outputs=True,
                        train_text_encoder=False, sample=True, network=NetworkSection(network_dim=4, network_alpha=2.0))
    bf16, fp8 = (plan(dataclasses.replace(base, t5xxl_precision=p), fake=False) for p in ("auto", "fp8"))
    assert {"text", "step", "sample"} <= set(bf16.phases) and bf16.trainable == 13_568
    encoder = Flux2Family().load(ModelSource(str(tiny_flux2["folder"]))).text_encoders["te"]
    linear = sum(m.weight.numel() for n, m in encoder.named_modules()
                 if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head"))
    # 2 bytes -> 1 byte for each Linear weight, less the bf16 copies the layer-by-layer casts hold at the peak
    assert bf16.phases["text"].allocated - fp8.phases["text"].allocated >= linear // 2


def test_a_diffusers_folder_save_reloads_the_same_model(tiny_flux2, tmp_path):
    """save_model_as = "diffusers" (train_db.py writes family.pipeline(parts)): a single-file-loaded klein saved as
    a folder loads back with the same transformer, VAE and text conditioning, as a Flux2KleinPipeline."""
    family = Flux2Family()
    parts = family.load(_single_file_source(tiny_flux2))
    family.pipeline(parts).save_pretrained(str(tmp_path / "saved"))
    assert get_family("auto", str(tmp_path / "saved")).name == "flux2"
    back = family.load(ModelSource(str(tmp_path / "saved")))
    for x, y in ((parts.denoiser, back.denoiser), (parts.vae, back.vae)):
        sa, sb = x.state_dict(), y.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.no_grad():
        assert torch.equal(family.encode_prompts(parts, ["a red dog"], 1)["prompt_embeds"],
                           family.encode_prompts(back, ["a red dog"], 1)["prompt_embeds"])


def test_merge_command_writes_a_flux2_file_with_the_adapter_in_it(flux2_config, tiny_flux2, tmp_path):
    """python -m networks.merge on the FLUX.2 single files (--text_encoder, --ae): the merged BFL file reloads to the
    transformer networks.merge makes in memory, which differs from the base."""
    from networks import merge

    result = train_network(flux2_config(train={"max_train_steps": 2}))
    out = tmp_path / "merged.safetensors"
    assert merge.main(["--model", str(tiny_flux2["transformer"]), "--text_encoder", str(tiny_flux2["text_encoder"]),
                       "--ae", str(tiny_flux2["ae"]), "--arch", str(tiny_flux2["folder"]), "--tokenizer",
                       str(tiny_flux2["folder"]), "--network", str(result.adapter_path), "--out", str(out)]) == 0
    family = Flux2Family()
    expected = family.load(ModelSource(str(tiny_flux2["folder"])))
    base = {k: v.clone() for k, v in expected.denoiser.state_dict().items()}
    merge.merge_lora({"denoiser": expected.denoiser}, family.adapter_targets(expected), str(result.adapter_path))
    merged = family.load(_single_file_source({**tiny_flux2, "transformer": out})).denoiser.state_dict()
    want = expected.denoiser.state_dict()
    assert merged.keys() == want.keys() and all(torch.equal(merged[k], want[k]) for k in want)
    assert not torch.equal(merged["transformer_blocks.0.attn.to_q.weight"],
                           base["transformer_blocks.0.attn.to_q.weight"])


def test_fp8_scaled_files_load_dequantized():
    """ComfyUI's fp8 files: float8 weights (times their scale_weight in "fp8_scaled" files) read into bf16; the
    scale_input keys and the scaled_fp8 marker are not weights."""
    from library.families.flux2 import dequantized

    weight = torch.tensor([[0.5, -1.0], [2.0, 0.25]])
    state = {"a.weight": weight.to(torch.float8_e4m3fn), "a.scale_weight": torch.tensor(3.0),
             "a.scale_input": torch.tensor(1.0), "scaled_fp8": torch.zeros(0),
             "b.weight": weight.to(torch.float8_e4m3fn), "c.bias": torch.ones(2)}
    out = dequantized(state)
    assert set(out) == {"a.weight", "b.weight", "c.bias"} and out["a.weight"].dtype == torch.bfloat16
    assert torch.equal(out["a.weight"], (weight * 3).to(torch.bfloat16))
    assert torch.equal(out["b.weight"].float(), weight)
    assert out["c.bias"] is state["c.bias"]


@pytest.mark.parametrize("arch, offered", [("flux2-klein-4b", True), ("flux2-klein-9b", True), ("flux2-dev", True),
                                           ("sdxl", False)])
def test_budget_search_offers_the_text_encoder_in_fp8(arch, offered):
    """--vram_budget's "t5xxl_precision = fp8" step applies to FLUX.2's Qwen3 / Mistral encoder too."""
    from library.planner.budget import _has_t5
    from library.planner.step import StepSettings

    assert _has_t5(StepSettings(recipe="network", family="flux2", arch=arch, width=64, height=64)) == offered
