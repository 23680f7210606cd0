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
