"""The DDPM noising rule and targets against their closed forms."""
import math

import torch
from diffusers import DDPMScheduler

from library.objectives import DiffusionObjective


def _objective(prediction="epsilon"):
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear")
    return DiffusionObjective.from_scheduler(scheduler, v_parameterization=prediction == "v_prediction")


def test_scaled_linear_alphas_cumprod_closed_form():
    objective = _objective()
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    expected = torch.cumprod(1 - betas, 0)
    assert torch.allclose(objective.alphas_cumprod, expected, rtol=1e-6)


def test_add_noise_and_targets_closed_form():
    objective = _objective("v_prediction")
    x0 = torch.full((2, 1, 1, 1), 2.0)
    eps = torch.full((2, 1, 1, 1), -1.0)
    t = torch.tensor([0, 999])
    abar = objective.alphas_cumprod[t]
    noisy = objective.add_noise(x0, eps, t).flatten()
    for i in range(2):
        a, s = math.sqrt(abar[i]), math.sqrt(1 - abar[i])
        assert noisy[i].item() == pytest_approx(2 * a - s)
        assert objective.target(x0, eps, t).flatten()[i].item() == pytest_approx(-a - 2 * s)
    assert torch.equal(_objective().target(x0, eps, t), eps)


def test_noisy_matches_diffusers_add_noise():
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear")
    objective = DiffusionObjective.from_scheduler(scheduler)
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([1, 500, 998])
    assert torch.allclose(objective.add_noise(x0, eps, t), scheduler.add_noise(x0, eps, t), atol=1e-6)


def test_timesteps_are_seeded_and_in_range():
    objective = _objective()
    a = objective.sample_timesteps(1000, torch.Generator().manual_seed(1))
    b = objective.sample_timesteps(1000, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 999


def pytest_approx(value):
    import pytest

    return pytest.approx(value, rel=1e-6)


def test_reduce_loss_mask_and_sample_weights_closed_form():
    from library.objectives import reduce_loss

    per_element = torch.tensor([[[[1.0, 3.0], [5.0, 7.0]]], [[[2.0, 2.0], [2.0, 2.0]]]])  # (2, 1, 2, 2)
    assert reduce_loss(per_element).item() == pytest_approx((4.0 + 2.0) / 2)
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]], [[[0.5, 0.5], [0.0, 0.0]]]])
    assert reduce_loss(per_element, mask).item() == pytest_approx((8.0 / 2 + 2.0) / 2)
    weights = torch.tensor([1.0, 0.25])
    assert reduce_loss(per_element, None, weights).item() == pytest_approx((4.0 + 0.5) / 2)


def test_zero_terminal_snr_matches_diffusers_rescale():
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

    from library.objectives import zero_terminal_snr

    objective = _objective()
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    expected = torch.cumprod(1 - rescale_zero_terminal_snr(betas), 0)
    got = zero_terminal_snr(objective.alphas_cumprod)
    assert got[-1] == 0 and torch.allclose(got, expected, atol=1e-9)
    assert objective.with_zero_terminal_snr().snr(torch.tensor([999])).item() == 0


def test_snr_weights_closed_form():
    from library.objectives import LossOptions, timestep_weights

    eps, v = _objective(), _objective("v_prediction")
    t = torch.tensor([10, 500, 990])
    snr = (eps.alphas_cumprod[t] / (1 - eps.alphas_cumprod[t]))
    assert timestep_weights(eps, t, LossOptions()) is None
    w = timestep_weights(eps, t, LossOptions(min_snr_gamma=5.0))
    assert torch.allclose(w.double(), torch.minimum(snr, torch.tensor(5.0)) / snr, rtol=1e-6)
    w = timestep_weights(v, t, LossOptions(min_snr_gamma=5.0))
    assert torch.allclose(w.double(), torch.minimum(snr, torch.tensor(5.0)) / (snr + 1), rtol=1e-6)
    w = timestep_weights(eps, t, LossOptions(debiased_estimation_loss=True))
    assert torch.allclose(w.double(), 1 / snr.clamp(max=1000).sqrt(), rtol=1e-6)
    w = timestep_weights(v, t, LossOptions(scale_v_pred_loss_like_noise_pred=True))
    assert torch.allclose(w.double(), snr.clamp(max=1000) / (snr.clamp(max=1000) + 1), rtol=1e-6)


def test_element_losses_and_huber_schedules_closed_form():
    from library.objectives import LossOptions, element_loss, huber_threshold

    pred, target = torch.tensor([[3.0]]), torch.tensor([[1.0]])  # difference 2
    c = torch.tensor([0.5])
    assert element_loss(pred, target, "l2").item() == 4.0
    assert element_loss(pred, target, "l1").item() == 2.0
    assert element_loss(pred, target, "huber", c).item() == pytest_approx(2 * 0.5 * (math.sqrt(4.25) - 0.5))
    assert element_loss(pred, target, "smooth_l1", c).item() == pytest_approx(2 * (math.sqrt(4.25) - 0.5))
    objective, t = _objective(), torch.tensor([0, 500, 1000 - 1])
    constant = huber_threshold(objective, t, LossOptions(huber_schedule="constant", huber_c=0.2, huber_scale=2.0))
    assert torch.allclose(constant, torch.tensor([0.4, 0.4, 0.4]))
    exponential = huber_threshold(objective, t, LossOptions(huber_schedule="exponential", huber_c=0.1))
    assert torch.allclose(exponential, torch.tensor([1.0, 0.1 ** 0.5, 0.1 ** 0.999]), rtol=1e-6)
    abar = objective.alphas_cumprod[t]
    sigma = ((1 - abar) / abar).sqrt()
    snr = huber_threshold(objective, t, LossOptions(huber_schedule="snr", huber_c=0.1))
    assert torch.allclose(snr.double(), 0.9 / (1 + sigma) ** 2 + 0.1, rtol=1e-6)


def test_noise_options():
    from library.objectives import LossOptions, apply_noise_offset, draw_noise

    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    base, same = draw_noise((2, 4, 8, 8), g())
    assert torch.equal(base, same) and torch.equal(base, torch.randn((2, 4, 8, 8), generator=g()))
    shifted = apply_noise_offset(torch.zeros(2, 4, 8, 8), 0.1, g())
    per_channel = torch.randn((2, 4, 1, 1), generator=g()) * 0.1
    assert torch.allclose(shifted, per_channel.expand(2, 4, 8, 8))
    target, noisy_with = draw_noise((2, 4, 8, 8), g(), LossOptions(ip_noise_gamma=0.1))
    gen = g()
    first = torch.randn((2, 4, 8, 8), generator=gen)
    assert torch.equal(target, first)
    assert torch.allclose(noisy_with, first + 0.1 * torch.randn((2, 4, 8, 8), generator=gen))
    pyramid, _ = draw_noise((2, 4, 64, 64), g(), LossOptions(multires_noise_iterations=6))
    assert pyramid.std().item() == pytest_approx(1.0)
    white = torch.randn((2, 4, 64, 64), generator=g())
    pooled = [torch.nn.functional.avg_pool2d(n, 16).std().item() for n in (pyramid, white)]
    assert pooled[0] > 1.5 * pooled[1]  # 0.118 vs 0.064 when written; low frequencies carry more energy than in white noise (std 1/16)


def test_adaptive_noise_scale_as_sd_scripts():
    """sd-scripts' apply_noise_offset: offset + scale * |latent mean over H, W|, floored at 0, times one N(0, 1)
    per sample and channel."""
    from library.objectives import LossOptions, draw_noise

    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    latents = latents + torch.tensor([0.5, -2.0, 0, 1])[:, None, None]
    means = latents.mean(dim=(2, 3), keepdim=True).abs()
    for scale in (0.5, -0.3):
        noise, _ = draw_noise((2, 4, 8, 8), g(), LossOptions(noise_offset=0.1, adaptive_noise_scale=scale), means)
        gen = g()
        white = torch.randn((2, 4, 8, 8), generator=gen)
        direction = torch.randn((2, 4, 1, 1), generator=gen)
        expected = white + torch.clamp(0.1 + scale * means, min=0.0) * direction
        assert torch.allclose(noise, expected, atol=1e-6)
        assert bool((torch.clamp(0.1 + scale * means, min=0.0) == 0).any()) is (scale < 0)  # the floor was reached
    plain, _ = draw_noise((2, 4, 8, 8), g(), LossOptions(noise_offset=0.1), means)
    assert not torch.allclose(plain, noise)


def test_timestep_bounds():
    objective = _objective()
    objective.min_timestep, objective.max_timestep = 200, 300
    t = objective.sample_timesteps(1000, torch.Generator().manual_seed(0))
    assert t.min() >= 200 and t.max() <= 299
    objective.min_timestep, objective.max_timestep = 300, 300
    assert objective.sample_timesteps(3, torch.Generator()).tolist() == [300, 300, 300]
