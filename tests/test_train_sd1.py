"""SD1 adapter training on the tiny model: golden losses, the saved file, reloading it here and in
diffusers, continuing from it, and the memory / data switches."""
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import close
from goldens import GOLDEN_SD1
from library.config import ConfigError
from library.families.base import ModelSource
from library.families.sd1 import SD1Family
from model_checks import inject_adapters, sd1_probe
from networks import files
from networks.settings import NetworkSettings
from networks.merge import merge_lora
from train_network import train


def test_golden_losses(make_config):
    assert close(train(make_config()).losses, GOLDEN_SD1)


@pytest.mark.parametrize("change", [
    {"model": {"v_parameterization": True}},  # the objective
    {"network": {"network_alpha": 4.0}},  # the adapter scale
    {"model": {"clip_skip": 2}},  # the conditioning
])
def test_golden_losses_notice_changes(make_config, change):
    losses = train(make_config(**change)).losses
    assert len(losses) == 4 and not close(losses, GOLDEN_SD1)


def test_golden_losses_notice_data_order(make_config, monkeypatch):
    from library.data import images, plan

    monkeypatch.setattr(plan, "list_images", lambda folder: images.list_images(folder)[::-1])
    assert not close(train(make_config()).losses, GOLDEN_SD1)


def _expected_layer_count(parts):
    """12 adapted linears per Transformer2DModel (proj_in/out, 2x attention q/k/v/out, 2 ff), 6 per CLIP layer."""
    transformers = sum(type(m).__name__ == "Transformer2DModel" for m in parts.denoiser.modules())
    return 12 * transformers, 6 * parts.text_encoders["te"].config.num_hidden_layers


def test_saved_file_keys_and_metadata(make_config):
    result = train(make_config())
    unet_layers, te_layers = _expected_layer_count(result.parts)
    assert (unet_layers, te_layers) == (84, 18)
    with safe_open(result.adapter_path, "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    names = {k.split(".", 1)[0] for k in keys}
    assert len(keys) == 3 * (unet_layers + te_layers)
    assert keys == {f"{n}.{s}" for n in names for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert sum(n.startswith("lora_unet_") for n in names) == unet_layers
    assert sum(n.startswith("lora_te_text_model_encoder_layers_") for n in names) == te_layers
    for name in ("lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_mid_block_attentions_0_"
                 "transformer_blocks_0_attn2_to_k", "lora_unet_up_blocks_2_attentions_1_transformer_blocks_0_ff_net_2",
                 "lora_te_text_model_encoder_layers_2_self_attn_out_proj", "lora_te_text_model_encoder_layers_0_mlp_fc1"):
        assert name in names
    tensors = load_file(result.adapter_path)
    assert tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (4, 32, 1, 1)
    assert float(tensors["lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"]) == 2.0
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "2.0" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and meta["ss_steps"] == "4"
    assert (result.adapter_path.parent / "lora-config.toml").is_file()


def test_reloaded_adapter_gives_identical_outputs(make_config, tiny_sd1):
    result = train(make_config(network={"conv_dim": 2, "conv_alpha": 1.0}))
    trained = sd1_probe(result.parts)
    family = SD1Family()
    parts = family.load(ModelSource(str(tiny_sd1[0])))
    settings = NetworkSettings(dim=4, alpha=2.0, conv_dim=2, conv_alpha=1.0)
    adapted = inject_adapters(family, parts, settings)
    assert files.load_into(adapted, result.adapter_path) == len(result.adapted[0].layers) + len(result.adapted[1].layers)
    for a, b in zip(sd1_probe(parts), trained):
        assert torch.equal(a, b)


def test_diffusers_loads_every_key_with_the_same_outputs_as_our_merge(make_config, tiny_sd1):
    from diffusers import StableDiffusionPipeline
    from peft.tuners.lora import LoraLayer

    result = train(make_config(network={"conv_dim": 2, "conv_alpha": 1.0}))
    path = str(result.adapter_path)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd1[0]), safety_checker=None)
    pipe.load_lora_weights(path)
    layers_in_file = {k.split(".", 1)[0] for k in load_file(path)}
    consumed = sum(isinstance(m, LoraLayer) for m in [*pipe.unet.modules(), *pipe.text_encoder.modules()])
    # attention/MLP 84, CLIP 18, LoCon 44: 11 resnets x (conv1, conv2, time_emb_proj) + 7 shortcuts + 4 samplers
    assert consumed == len(layers_in_file) == 84 + 18 + 44

    family = SD1Family()
    merged = family.load(ModelSource(str(tiny_sd1[0])))
    merge_lora({"denoiser": merged.denoiser, "te": merged.text_encoders["te"]}, family.adapter_targets(merged), path)
    base = sd1_probe(family.load(ModelSource(str(tiny_sd1[0]))))
    ours = sd1_probe(merged)
    theirs = sd1_probe(type("P", (), {"tokenizers": {"te": pipe.tokenizer}, "text_encoders": {"te": pipe.text_encoder},
                                   "denoiser": pipe.unet})())
    trained = sd1_probe(result.parts)
    for o, t, p, b in zip(ours, theirs, trained, base):
        assert torch.allclose(o, t, atol=1e-5) and torch.allclose(o, p, atol=1e-5)
        assert (o - b).abs().max() > 1e-3  # the adapter changed something


def test_continue_from_network_weights(make_config, tmp_path):
    first = train(make_config(save={"save_every_n_steps": 2}))
    assert [p.name for p in first.saved] == ["lora-step00000002.safetensors", "lora.safetensors"]
    cfg = make_config(network={"network_weights": str(first.adapter_path)},
                      train={"output_name": "continued", "max_train_steps": 1}, optimizer={"learning_rate": 0.0})
    again = train(cfg)
    assert load_file(again.adapter_path).keys() == load_file(first.adapter_path).keys()
    for key, value in load_file(first.adapter_path).items():
        assert torch.equal(load_file(again.adapter_path)[key], value), key


@pytest.mark.parametrize("change, message", [
    ({"network": {"network_dim": 8}}, "has network_dim 4 (metadata ss_network_dim)"),  # before the model loads
    ({"network": {"network_alpha": 1.0}}, "alpha is 2"),  # the rest once the adapters exist
    ({"network": {"network_train_unet_only": True}}, "match no layer"),
])
def test_mismatched_network_weights_are_refused(make_config, change, message):
    first = train(make_config())
    change = {**change, "train": {"output_name": "second"}}
    change["network"] = {**change["network"], "network_weights": str(first.adapter_path)}
    with pytest.raises(ConfigError, match=re.escape(f"'network.network_weights': {first.adapter_path}") + ".*"
                       + re.escape(message)):
        train(make_config(**change))


def test_caches_unet_only_and_accumulation(make_config):
    result = train(make_config(network={"network_train_unet_only": True},
                               dataset={"cache_latents": True, "train_batch_size": 1},
                               train={"cache_text_encoder_outputs": True, "gradient_accumulation_steps": 2}))
    assert len(result.losses) == 4 and all(0 < x < 3 for x in result.losses)
    assert all(k.startswith("lora_unet_") for k in load_file(result.adapter_path))


def test_cached_text_outputs_with_a_trained_sd1_text_encoder_are_refused(make_config):
    """SD1 has no encoder to cache apart (FLUX.1 / SD3 cache T5 while the CLIPs train): with the family found
    from the files, the config error names the key and the fix, before a step is taken."""
    with pytest.raises(ConfigError, match=r"'train.cache_text_encoder_outputs' needs a frozen text encoder with "
                                          r"sd1 .*'network.network_train_unet_only' = true"):
        train(make_config(train={"cache_text_encoder_outputs": True}))


def test_adaptive_noise_scale_reaches_the_step(make_config):
    """The latents of each batch scale its noise offset: the same run with adaptive_noise_scale loses
    differently; without noise_offset the key is refused, naming both."""
    offset = train(make_config(loss={"noise_offset": 0.1}, train={"max_train_steps": 2}))
    adaptive = train(make_config(loss={"noise_offset": 0.1, "adaptive_noise_scale": 0.5},
                                 train={"max_train_steps": 2, "output_name": "adaptive"}))
    assert offset.losses[0] != pytest.approx(adaptive.losses[0], rel=1e-4)
    with pytest.raises(ConfigError, match=r"test.toml: 'loss.adaptive_noise_scale' .* 'loss.noise_offset'"):
        make_config(loss={"adaptive_noise_scale": 0.5}, train={"output_name": "third"})


def test_validation_loss_on_held_out_images(make_config):
    """validation_split 0.25 holds 2 of the 8 images out; the validation loss (every 2 steps and each epoch's
    end) is the loss at timesteps 200, 400, 600, 800 with noise drawn from validation_seed, recomputed here
    with diffusers' scheduler and the U-Net directly."""
    import torch.nn.functional as F

    from library.data.plan import plan_data

    cfg = make_config(train={"validation_split": 0.25, "validation_seed": 11, "validate_every_n_steps": 2})
    plan = plan_data(cfg, say=lambda *a: None)
    assert len(plan.validation) == 2 and len(plan.images) == 6
    assert not {r.path for r in plan.validation} & {r.path for r in plan.images}
    result = train(cfg)
    steps = [s for s, _ in result.validation_losses]
    assert steps == [2, 3, 4, 4]  # every 2 steps, and at the end of epochs 1 (3 steps) and 2
    assert result.validation_losses[2][1] == result.validation_losses[3][1]  # the same noise and timesteps
    assert result.validation_losses[0][1] != result.validation_losses[2][1]  # the adapter moved
    parts, family = result.parts, SD1Family()
    from library.data.training_set import TrainingSet

    from library.data.plan import DataPlan

    held = TrainingSet(DataPlan(plan.layout, plan.validation, [0, 1]), 7, 1.0)
    generator, losses = torch.Generator().manual_seed(11), []
    with torch.no_grad():
        for i in range(2):
            example = held.plain_example(i)
            latents = parts.vae.encode(example["pixels"][None]).latent_dist.sample(generator)
            latents = latents * parts.vae.config.scaling_factor
            text = family.encode_prompts(parts, [example["caption"]], 1)["encoder_hidden_states"]
            for t in (200, 400, 600, 800):
                noise = torch.randn(latents.shape, generator=generator)
                noisy = parts.noise_scheduler.add_noise(latents, noise, torch.tensor([t]))
                prediction = parts.denoiser(noisy, torch.tensor([t]), encoder_hidden_states=text).sample
                losses.append(F.mse_loss(prediction, noise).item())
    assert result.validation_losses[-1][1] == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_adafactor_trains(make_config):
    result = train(make_config(optimizer={"optimizer_type": "Adafactor"}))
    assert result.losses[0] == pytest.approx(GOLDEN_SD1[0], rel=1e-5) and not close(result.losses, GOLDEN_SD1)


def test_adamw8bit_keeps_8bit_states(make_config):
    # bitsandbytes keeps tensors under min_8bit_size (4096) in 32 bits; the tiny adapters are smaller
    result = train(make_config(optimizer={"optimizer_type": "AdamW8bit", "optimizer_args": ["min_8bit_size=16"]}))
    states = [s for s in result.optimizer.state.values() if "state1" in s]
    assert states and all(s["state1"].dtype == torch.uint8 for s in states)
    assert result.losses == pytest.approx(GOLDEN_SD1, rel=1e-3)  # same update as AdamW, up to quantisation


def test_gradient_checkpointing_gives_the_same_losses(make_config):
    assert close(train(make_config(train={"gradient_checkpointing": True})).losses, GOLDEN_SD1)


def test_it_learns_and_samples(make_config, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\na photo of a red circle\n")
    result = train(make_config(network={"network_dim": 8, "network_alpha": 8.0},
                               train={"max_train_steps": 40}, logging={"report_denoising_loss": True},
                               sample={"sample_prompts": str(prompts), "sample_steps": 4}))
    assert result.trained_loss < 0.95 * result.base_loss  # 1.012 vs 1.115 when written
    from PIL import Image

    assert [p.name for p in result.samples] == ["lora_step00000040_00_1234.png"]
    assert Image.open(result.samples[0]).size == (64, 64)


def test_sd2_v_prediction_from_a_single_file(make_config, tiny_sd2):
    folder, single = tiny_sd2
    result = train(make_config(model={"pretrained_model_name_or_path": str(single), "arch": str(folder),
                                      "tokenizer": str(folder / "tokenizer"), "v_parameterization": True}))
    assert len(result.losses) == 4 and not close(result.losses, GOLDEN_SD1)
    with safe_open(result.adapter_path, "pt") as f:
        meta = f.metadata()
        assert "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight" in f.keys()
        assert f.get_tensor("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight").dim() == 2  # Linear
    assert meta["ss_base_model_version"] == "sd_v2" and meta["ss_v_parameterization"] == "True"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert meta["modelspec.prediction_type"] == "v_prediction"


def test_bf16_mixed_precision_keeps_adapters_fp32_and_logs_to_tensorboard(make_config, tmp_path):
    result = train(make_config(train={"mixed_precision": "bf16"}, logging={"log_with": "tensorboard"}))
    assert result.parts.denoiser.conv_in.weight.dtype == torch.bfloat16  # frozen, not adapted
    assert {p.dtype for c in result.adapted for p in c.parameters()} == {torch.float32}
    assert result.losses == pytest.approx(GOLDEN_SD1, rel=0.05) and not close(result.losses, GOLDEN_SD1)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "out" / "logs" / "lora").glob("events.*"))))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
