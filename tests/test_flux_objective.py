"""Flow matching (SD3, FLUX.1) against closed forms: noising, target, prediction types, timestep sampling,
loss weighting, the [loss] keys and the options that are refused."""
import math
from types import SimpleNamespace

import pytest
import torch

from library.config import ConfigError, LossSection
from library.objectives import (DiffusionObjective, FlowMatchObjective, LossOptions, configure, denoising_loss,
                                flow_shift, flux_time_shift, huber_threshold)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_noising_target_and_prediction_types():
    x0, noise = torch.ones(2, 4, 2, 2), torch.full((2, 4, 2, 2), 2.0)
    t = torch.tensor([250.0, 1000.0])
    o = FlowMatchObjective()
    noisy = o.add_noise(x0, noise, t)
    assert torch.allclose(noisy[0], torch.full((4, 2, 2), 0.75 * 1 + 0.25 * 2))
    assert torch.allclose(noisy[1], noise[1])  # s = 1: pure noise
    assert torch.equal(o.target(x0, noise, t), noise - x0)
    pred = torch.full_like(x0, 3.0)
    assert torch.equal(FlowMatchObjective(model_prediction_type="raw").model_output(pred, noisy, t), pred)
    assert torch.allclose(FlowMatchObjective(model_prediction_type="additive").model_output(pred, noisy, t),
                          pred + noisy)
    scaled = FlowMatchObjective(model_prediction_type="sigma_scaled").model_output(pred, noisy, t)
    assert torch.allclose(scaled[0], 1.25 - 0.25 * 3.0 * torch.ones(4, 2, 2))
    assert torch.allclose(scaled[1], 2.0 - 1.0 * 3.0 * torch.ones(4, 2, 2))


def test_loss_weighting_closed_forms():
    t = torch.tensor([500.0, 250.0])
    sig = FlowMatchObjective(weighting_scheme="sigma_sqrt").loss_weights(t)
    assert torch.allclose(sig, torch.tensor([4.0, 16.0]))
    cos = FlowMatchObjective(weighting_scheme="cosmap").loss_weights(t)
    assert torch.allclose(cos, torch.tensor([2 / (math.pi * 0.5), 2 / (math.pi * (1 - 0.5 + 2 * 0.0625))]))
    assert FlowMatchObjective(weighting_scheme="none").loss_weights(t) is None
    assert FlowMatchObjective(weighting_scheme="logit_normal").loss_weights(t) is None  # a density, not a weight
    # sd-scripts applies the weighting with sigma_scaled only
    assert FlowMatchObjective(weighting_scheme="sigma_sqrt", model_prediction_type="raw").loss_weights(t) is None


def test_uniform_sigmoid_shift_sampling():
    n = 6
    u = torch.rand((n,), generator=gen(), dtype=torch.float64)
    z = torch.randn((n,), generator=gen(), dtype=torch.float64)
    o = FlowMatchObjective(timestep_sampling="uniform")
    assert torch.allclose(o.sample_timesteps(n, gen()), (u * 1000).float())
    o = FlowMatchObjective(timestep_sampling="sigmoid", sigmoid_scale=2.0)
    assert torch.allclose(o.sample_timesteps(n, gen()), (torch.sigmoid(2 * z) * 1000).float())
    o = FlowMatchObjective(timestep_sampling="shift", discrete_flow_shift=3.0)
    s = torch.sigmoid(z)
    assert torch.allclose(o.sample_timesteps(n, gen()), (3 * s / (1 + 2 * s) * 1000).float())
    assert flow_shift(torch.tensor(0.5), 3.0) == pytest.approx(0.75)
    assert flow_shift(torch.tensor(0.3), 1.0) == pytest.approx(0.3)  # shift 1: identity


def test_flux_shift_depends_on_the_latent_size():
    # 32x32 latents: packed sequence 16 * 16 = 256 -> mu = 0.5; 128x128: 4096 -> mu = 1.15
    assert flux_time_shift(torch.tensor(0.5), 256) == pytest.approx(math.exp(0.5) / (math.exp(0.5) + 1))
    assert flux_time_shift(torch.tensor(0.25), 4096) == pytest.approx(math.exp(1.15) / (math.exp(1.15) + 3))
    o = FlowMatchObjective(timestep_sampling="flux_shift")
    z = torch.randn((3,), generator=gen(), dtype=torch.float64)
    expected = math.exp(1.15) / (math.exp(1.15) + 1 / torch.sigmoid(z) - 1) * 1000
    assert torch.allclose(o.sample_timesteps(3, gen(), latent_shape=(3, 16, 128, 128)), expected.float())
    small = o.sample_timesteps(3, gen(), latent_shape=(3, 16, 32, 32))
    assert (small < o.sample_timesteps(3, gen(), latent_shape=(3, 16, 128, 128))).all()  # larger: noisier


@pytest.mark.parametrize("scheme", ["none", "logit_normal", "mode"])
def test_sigma_sampling_uses_the_diffusers_flow_scheduler_table(scheme):
    from diffusers import FlowMatchEulerDiscreteScheduler

    n = 8
    table = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).timesteps
    if scheme == "logit_normal":
        u = torch.sigmoid(torch.randn((n,), generator=gen(), dtype=torch.float64) * 0.5 + 0.2)
    else:
        u = torch.rand((n,), generator=gen(), dtype=torch.float64)
        if scheme == "mode":
            u = 1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    expected = table[(u * 1000).long().clamp(0, 999)]
    o = FlowMatchObjective(timestep_sampling="sigma", weighting_scheme=scheme, logit_mean=0.2, logit_std=0.5,
                           discrete_flow_shift=3.0)
    assert torch.allclose(o.sample_timesteps(n, gen()), expected.float(), atol=1e-3)


def test_timestep_range():
    o = FlowMatchObjective(timestep_sampling="uniform", min_timestep=200, max_timestep=400)
    t = o.sample_timesteps(100, gen())
    assert (t >= 200).all() and (t < 400).all()


def test_denoising_loss_with_flow_matching():
    """A denoiser predicting zeros: raw loss = mean((noise - x0)^2); sigma_scaled compares x_t with noise - x0."""
    family = SimpleNamespace(predict=lambda parts, noisy, t, c: torch.zeros_like(noisy))
    x0 = torch.randn(2, 4, 4, 4, generator=gen(1))
    noise = torch.randn(2, 4, 4, 4, generator=gen(2))
    t = torch.tensor([300.0, 700.0])
    raw = denoising_loss(family, None, FlowMatchObjective(model_prediction_type="raw"), x0, {}, noise, t)
    assert raw.item() == pytest.approx(((noise - x0) ** 2).mean().item(), rel=1e-6)
    o = FlowMatchObjective(model_prediction_type="sigma_scaled", weighting_scheme="sigma_sqrt")
    noisy = o.add_noise(x0, noise, t)
    per_sample = ((noisy - (noise - x0)) ** 2).flatten(1).mean(1) * torch.tensor([0.3**-2, 0.7**-2])
    assert denoising_loss(family, None, o, x0, {}, noise, t).item() == pytest.approx(per_sample.mean().item(),
                                                                                        rel=1e-5)


def test_huber_snr_schedule_for_flow_matching():
    """c = (1 - c0) / (1 + s / (1 - s))^2 + c0 = (1 - c0)(1 - s)^2 + c0."""
    c = huber_threshold(FlowMatchObjective(), torch.tensor([200.0, 800.0]), LossOptions(loss_type="huber"))
    assert torch.allclose(c, torch.tensor([0.9 * 0.64 + 0.1, 0.9 * 0.04 + 0.1]), atol=1e-5)


def test_loss_section_configures_the_flow_objective():
    section = LossSection(timestep_sampling="shift", discrete_flow_shift=3.1582, model_prediction_type="raw",
                          weighting_scheme="uniform", min_timestep=10)
    o, options = configure(FlowMatchObjective(discrete_flow_shift=1.0), section)
    assert (o.timestep_sampling, o.discrete_flow_shift, o.model_prediction_type, o.weighting_scheme) == (
        "shift", 3.1582, "raw", "none")
    assert o.sigmoid_scale == 1.0 and o.min_timestep == 10 and options.loss_type == "l2"
    # unset keys keep the family's defaults
    o, _ = configure(FlowMatchObjective(discrete_flow_shift=1.0), LossSection())
    assert o.discrete_flow_shift == 1.0 and o.timestep_sampling == "sigma"


@pytest.mark.parametrize("key,value", [("min_snr_gamma", 5.0), ("debiased_estimation_loss", True),
                                       ("scale_v_pred_loss_like_noise_pred", True), ("zero_terminal_snr", True)])
def test_snr_options_refused_for_flow_matching(key, value):
    with pytest.raises(ConfigError, match=f"'loss.{key}'.*flow matching"):
        configure(FlowMatchObjective(), LossSection(**{key: value}))


def test_flow_keys_refused_for_ddpm_families():
    ddpm = DiffusionObjective(torch.linspace(0.99, 0.01, 1000, dtype=torch.float64))
    with pytest.raises(ConfigError, match="'loss.timestep_sampling': a flow-matching option"):
        configure(ddpm, LossSection(timestep_sampling="shift"))


def test_flow_keys_in_config_files(tmp_path):
    from library.config_files import config_from_dict

    cfg = config_from_dict({"model": {"pretrained_model_name_or_path": "x/y", "t5xxl_max_token_length": 256},
                            "dataset": {"train_data_dir": str(tmp_path)}, "train": {"output_dir": str(tmp_path)},
                            "loss": {"timestep_sampling": "flux_shift", "weighting_scheme": "logit_normal"}})
    assert cfg.loss.timestep_sampling == "flux_shift" and cfg.model.t5xxl_max_token_length == 256
    with pytest.raises(ConfigError, match="timestep_sampling"):
        config_from_dict({"model": {"pretrained_model_name_or_path": "x/y"}, "dataset": {"train_data_dir": "."},
                          "train": {"output_dir": str(tmp_path)}, "loss": {"timestep_sampling": "logit"}})
    # an sd-scripts flat file maps the keys to their sections
    flat = config_from_dict({"pretrained_model_name_or_path": "x/y", "train_data_dir": str(tmp_path),
                             "output_dir": str(tmp_path), "model_prediction_type": "raw", "guidance_scale": 1.0,
                             "discrete_flow_shift": 3.1582, "apply_t5_attn_mask": True})
    assert flat.loss.model_prediction_type == "raw" and flat.model.guidance_scale == 1.0
    assert flat.model.apply_t5_attn_mask
    sd3 = config_from_dict({"pretrained_model_name_or_path": "x/y", "train_data_dir": str(tmp_path),
                            "output_dir": str(tmp_path), "training_shift": 3.0})
    assert sd3.loss.discrete_flow_shift == 3.0
