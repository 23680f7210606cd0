"""Z-Image on the tiny Z-Image-architecture model: the shipped architecture, the original (ComfyUI) layout against
diffusers' converter, loading (folder, and ComfyUI's split transformer / text_encoder / ae files), the Qwen3
conditioning and the transformer call against diffusers' ZImagePipeline, golden losses of adapter and full
fine-tune runs, the same losses with cached text outputs and with block swap, fp8 base, the adapter in diffusers
and its key names as ComfyUI maps them."""
import pytest
import torch
from safetensors.torch import load_file

from conftest import (FULL_FINE_TUNE, assert_cached_text_outputs_change_nothing, assert_model_file_refused,
                      assert_samples_reproducible, block_swapped_run, close, lora_layers, peft_adapter_in_pipeline,
                      pipeline_parts, predict_caption, split_files_source, train_db, train_network)
from goldens import GOLDEN_ZIMAGE, GOLDEN_ZIMAGE_DB
from library.families import get_family
from library.families.base import ModelSource
from library.families.zimage import ZImageFamily
from library.loading import CheckpointError, arch_dir
from model_checks import assert_same_weights, comfy_lora_applied, comfy_lora_names


def _split_files_source(files, **extra):
    return split_files_source(files, "text_encoder", "ae", **extra)


def test_shipped_zimage_configs_build_the_real_architecture():
    from diffusers import ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    arch = arch_dir("zimage")
    with torch.device("meta"):
        transformer = ZImageTransformer2DModel.from_config(
            ZImageTransformer2DModel.load_config(str(arch / "transformer")))
        qwen = Qwen3Model(Qwen3Config.from_pretrained(str(arch / "text_encoder")))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(transformer) == 6_154_908_736  # "6B" (6.15B)
    assert count(qwen) == 4_022_468_096  # Qwen3-4B
    assert qwen.config.hidden_size == transformer.config.cap_feat_dim


def test_original_layout_is_the_inverse_of_diffusers_converter():
    """Ours -> original -> diffusers' own converter gives back the same keys and shapes (full width, meta device)."""
    from diffusers import ZImageTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    from library.zimage_layout import PREFIX, kohya_layout, original_to_transformer, transformer_to_original

    with torch.device("meta"):
        model = ZImageTransformer2DModel(n_layers=1, n_refiner_layers=1)
    state = model.state_dict()
    original = transformer_to_original(state)
    assert {"layers.0.attention.qkv.weight", "layers.0.attention.out.weight", "layers.0.attention.q_norm.weight",
            "x_embedder.weight", "final_layer.linear.weight", "noise_refiner.0.feed_forward.w2.weight",
            "context_refiner.0.attention.qkv.weight"} <= set(original)
    assert not any("to_q" in k or "to_out" in k or k.startswith("all_") for k in original)
    theirs = convert_z_image_transformer_checkpoint_to_diffusers({PREFIX + k: v for k, v in original.items()})
    ours = original_to_transformer({PREFIX + k: v for k, v in original.items()})
    assert set(theirs) == set(state) == set(ours)
    assert all(theirs[k].shape == state[k].shape == ours[k].shape for k in state)
    assert kohya_layout("layers.3.attention.to_v") == ("layers.3.attention.qkv", 2, 3)
    assert kohya_layout("noise_refiner.0.attention.to_out.0") == ("noise_refiner.0.attention.out", 0, 1)
    assert kohya_layout("layers.0.feed_forward.w1") == ("layers.0.feed_forward.w1", 0, 1)


def test_split_files_and_folder_give_identical_weights(tiny_zimage):
    assert get_family("auto", str(tiny_zimage["folder"])).name == "zimage"
    assert get_family("auto", str(tiny_zimage["transformer"])).name == "zimage"
    family = ZImageFamily()
    a = family.load(ModelSource(str(tiny_zimage["folder"])))
    b = family.load(_split_files_source(tiny_zimage))
    assert_same_weights(a, b)
    assert torch.equal(a.text_encoders["te"].rotary_emb.inv_freq, b.text_encoders["te"].rotary_emb.inv_freq)
    with pytest.raises(CheckpointError, match="model.text_encoder, model.ae"):
        family.load(ModelSource(str(tiny_zimage["transformer"])))


def test_other_families_files_stay_theirs(tiny_sd1, tiny_zimage):
    assert not ZImageFamily().claims(str(tiny_sd1[0])) and not ZImageFamily().claims(str(tiny_sd1[1]))
    assert get_family("auto", str(tiny_sd1[1])).name == "sd1"


def test_text_conditioning_and_prediction_are_zimage_pipeline(tiny_zimage):
    """Qwen3's second-to-last state of the chat-templated caption, its real tokens only, as
    ZImagePipeline.encode_prompt; predict() is the negated transformer output at t = 1 - s, as its loop."""
    family = ZImageFamily()
    parts = family.load(ModelSource(str(tiny_zimage["folder"])))
    captions = ["a photo of a red circle", "blue"]
    pipe = family.pipeline(parts)
    with torch.no_grad():
        ours = family.encode_prompts(parts, captions, 1)
        theirs, _ = pipe.encode_prompt(list(captions), device="cpu", do_classifier_free_guidance=False)
    assert ours["prompt_embeds"].shape == (2, 512, 32)
    for i, embeds in enumerate(theirs):
        n = int(ours["text_mask"][i].sum())
        assert n == embeds.shape[0] and torch.equal(ours["prompt_embeds"][i, :n], embeds)
    assert ours["text_mask"][1].sum() < ours["text_mask"][0].sum()
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([750.0, 250.0])
    with torch.no_grad():
        prediction = family.predict(parts, latents, timesteps, ours)
        out = parts.denoiser(list(latents.unsqueeze(2).unbind(0)), (1000 - timesteps) / 1000, theirs,
                             return_dict=False)[0]
    assert torch.equal(prediction, -torch.stack(out).squeeze(2))


def test_padding_tokens_do_not_reach_the_image(tiny_zimage):
    """Changing a caption state past the caption's real tokens leaves the prediction as it is; changing a real one
    changes it."""
    family = ZImageFamily()
    parts = family.load(ModelSource(str(tiny_zimage["folder"])))
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        text = family.encode_prompts(parts, ["blue"], 1)
        n = int(text["text_mask"].sum())

        def predict_with(position):
            embeds = text["prompt_embeds"].clone()
            embeds[0, position] += 5.0
            return family.predict(parts, latents, torch.tensor([500.0]), {**text, "prompt_embeds": embeds})

        base = family.predict(parts, latents, torch.tensor([500.0]), text)
        assert torch.equal(predict_with(n), base)
        assert not torch.allclose(predict_with(n - 1), base)


def test_objective_is_the_models_shift(tiny_zimage):
    parts = ZImageFamily().load(ModelSource(str(tiny_zimage["folder"])))
    objective = ZImageFamily().objective(parts)
    assert (objective.timestep_sampling, objective.discrete_flow_shift, objective.model_prediction_type) == (
        "shift", 3.0, "raw")


# ---- training -----------------------------------------------------------------------------------


def test_golden_losses_lora_with_comfyui_names(zimage_config, tiny_zimage):
    """The kohya file names layers as the original checkpoint does (q/k/v fused into qkv): each name is a weight
    of the ComfyUI-layout transformer file with dots as underscores, which is how ComfyUI maps lora_unet_ keys."""
    result = train_network(zimage_config())
    assert close(result.losses, GOLDEN_ZIMAGE), result.losses
    assert {c.target.kohya_prefix for c in result.adapted} == {"lora_unet"}
    names = {k.split(".", 1)[0] for k in load_file(result.adapter_path)}
    assert names <= set(comfy_lora_names(load_file(tiny_zimage["transformer"])))
    assert {"lora_unet_layers_0_attention_qkv", "lora_unet_layers_1_attention_out",
            "lora_unet_noise_refiner_0_feed_forward_w2", "lora_unet_context_refiner_0_attention_qkv",
            "lora_unet_layers_1_adaLN_modulation_0"} <= names
    # every Linear of every block: 4 attention + 3 feed-forward (+ 1 modulation where the block has one)
    assert sum(len(c.layers) for c in result.adapted) == 2 * 8 + 8 + 7


def test_cached_text_outputs_give_the_same_losses(zimage_config):
    assert_cached_text_outputs_change_nothing(zimage_config)


def test_block_swap_gives_the_same_losses(zimage_config):
    assert block_swapped_run(zimage_config, 4).parts.denoiser._block_swapper.loads == 2 * 8


def test_golden_losses_full_fine_tune_and_single_file_reload(zimage_config, tiny_zimage):
    result = train_db(zimage_config(**FULL_FINE_TUNE))
    assert close(result.losses, GOLDEN_ZIMAGE_DB), result.losses
    reloaded = ZImageFamily().load(_split_files_source({**tiny_zimage, "transformer": result.model_path}))
    assert_same_weights(result.parts, reloaded)


def test_adapter_in_diffusers_every_key_consumed(zimage_config, tiny_zimage):
    """peft-layout file: ZImagePipeline.load_lora_weights consumes every key, with our outputs."""
    from diffusers import ZImagePipeline

    result, tensors, pipe = peft_adapter_in_pipeline(zimage_config, ZImagePipeline, tiny_zimage["folder"])
    assert lora_layers(pipe.transformer) == sum(len(c.layers) for c in result.adapted) == len(tensors) // 2
    family = ZImageFamily()
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    theirs = pipeline_parts(pipe, result.parts.source, {"te": pipe.text_encoder}, {"te": pipe.tokenizer})
    assert torch.allclose(*(predict_caption(family, parts, latents) for parts in (result.parts, theirs)), atol=1e-5)


def test_samples_are_reproducible_and_follow_the_negative_prompt(tiny_zimage):
    import numpy as np

    family = ZImageFamily()
    parts = family.load(ModelSource(str(tiny_zimage["folder"])))

    def sample(negative, seed=5):
        return np.asarray(family.sample(parts, "a red dog", 64, 64, 2, seed, "euler", 1, negative, 4.0))

    assert_samples_reproducible(sample)


def test_fp8_base_stays_close_to_bf16(zimage_config):
    """fp8_base stores the frozen transformer's Linears in float8 and computes in bf16: every block Linear but the
    adapters' own, and losses within fp8 rounding of the bf16 run (measured: within 1%)."""
    bf16 = {"max_train_steps": 2, "mixed_precision": "bf16"}
    plain = train_network(zimage_config(train=bf16))
    fp8 = train_network(zimage_config(train={**bf16, "fp8_base": True}, save={"overwrite": True}))
    stored = [m for m in fp8.parts.denoiser.modules() if isinstance(m, torch.nn.Linear)
              and m.weight.dtype == torch.float8_e4m3fn]
    assert len(stored) >= 31  # every adapted layer's frozen base, the embedders and the final layer
    assert fp8.losses == pytest.approx(plain.losses, rel=0.01) and fp8.losses != plain.losses


def test_planner_knows_zimage_and_its_estimate_matches_real_allocations(tiny_zimage):
    import types

    from library.config import NetworkSection
    from library.planner import plan
    from library.planner.architecture import resolve
    from library.planner.step import StepSettings

    named = types.SimpleNamespace(pretrained_model_name_or_path="/models/z_image_turbo_bf16.safetensors",
                                  family="auto", arch=None, v2=False)
    assert resolve(named) == ("zimage", "zimage")
    s = StepSettings(recipe="network", family="zimage", arch=str(tiny_zimage["folder"]), width=64, height=64,
                     batch_size=2, network=NetworkSection(network_dim=4, network_alpha=2.0))
    fake, real = plan(s, fake=True), plan(s, fake=False)
    assert real.peak > 0
    assert abs(fake.peak - real.peak) <= 0.10 * real.peak, (fake.peak, real.peak)


@pytest.mark.parametrize("model, said", [
    ({}, "a Z-Image transformer file holds the transformer only; set model.text_encoder, model.ae to the separate "
         "files"),
    ({"family": "flux"}, "is a checkpoint of family \"zimage\" (from its tensor names), but 'model.family' = "
                         "\"flux\": set model.family = \"zimage\""),
])
def test_zimage_file_faults_exit_2_naming_the_key(model, said, tiny_zimage, config_error):
    assert_model_file_refused(config_error, tiny_zimage["transformer"], said, **model)


def test_kohya_file_applied_as_comfyui_applies_it_gives_the_trained_outputs(zimage_config, tiny_zimage):
    """ComfyUI's rule for lora_unet_ keys: the name is a weight of the model's own (original-layout) state dict with
    dots as underscores, and W += alpha / rank * up @ down. Applied so to the ComfyUI-layout file, every key finds
    its weight and the patched model predicts what the trained adapter does."""
    from library.zimage_layout import original_to_transformer

    result = train_network(zimage_config(train={"max_train_steps": 2}))
    tensors = load_file(result.adapter_path)
    original = load_file(tiny_zimage["transformer"])
    comfy_lora_applied(tensors, original)
    family = ZImageFamily()
    patched = family.load(ModelSource(str(tiny_zimage["folder"])))
    patched.denoiser.load_state_dict(original_to_transformer(original))
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    outs = [predict_caption(family, parts, latents) for parts in (result.parts, patched)]
    assert torch.allclose(*outs, atol=1e-5)
    base = predict_caption(family, family.load(ModelSource(str(tiny_zimage["folder"]))), latents)
    assert not torch.allclose(outs[0], base, atol=1e-5)  # the adapter changed the outputs



def test_prediction_on_the_test_device_reads_no_caption_lengths_from_it(tiny_zimage, gpu):
    """On a device distinct from the host: encode_prompts keeps the caption mask on the host, so predict() reads no
    device value for the caption lengths; a mask on the device (cached text outputs) gives the same prediction
    with reads. Forward only: the test device aborts in the backward of a complex multiply, which diffusers'
    Z-Image RoPE uses (a limit of tests/fake_device.cpp), so Z-Image training is not run on it."""
    import fake_device

    family = ZImageFamily()
    parts = family.load(ModelSource(str(tiny_zimage["folder"])))
    parts.denoiser.to(gpu), parts.text_encoders["te"].to(gpu)
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0)).to(gpu)
    timesteps = torch.tensor([750.0, 250.0]).to(gpu)
    with torch.no_grad():
        text = family.encode_prompts(parts, ["a photo of a red circle", "blue"], 1)
        assert fake_device.on_device(text["prompt_embeds"]) and text["text_mask"].device.type == "cpu"
        def syncs():
            return fake_device.value_reads() + fake_device.copies_to_host()

        before = syncs()
        out = family.predict(parts, latents, timesteps, text)
        host_mask_reads = syncs() - before
        before = syncs()
        again = family.predict(parts, latents, timesteps, {**text, "text_mask": text["text_mask"].to(gpu)})
        device_mask_reads = syncs() - before
    assert fake_device.on_device(out) and torch.equal(out.cpu(), again.cpu())
    assert host_mask_reads == 0 and device_mask_reads == 1


def test_samples_during_training_leave_the_losses_as_they_are(zimage_config, tmp_path):
    """Samples every 2 steps (one without CFG, as Z-Image-Turbo samples, one with a negative prompt) with the text
    outputs cached: Qwen3 comes back to encode the prompts; the losses stay the golden ones."""
    from PIL import Image

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --d 9 --s 2 --l 0\na blue square --w 32 --h 48 --s 2 --n blurry --l 4\n")
    result = train_network(zimage_config(sample={"sample_prompts": str(prompts), "sample_every_n_steps": 2},
                                         train={"cache_text_encoder_outputs": True}))
    assert close(result.losses, GOLDEN_ZIMAGE), result.losses
    assert [p.name for p in result.samples] == [
        "lora_step00000002_00_9.png", "lora_step00000002_01_1235.png", "lora_step00000002_grid.png",
        "lora_step00000004_00_9.png", "lora_step00000004_01_1235.png", "lora_step00000004_grid.png"]
    assert Image.open(result.samples[1]).size == (32, 48)
