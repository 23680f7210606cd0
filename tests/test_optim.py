"""Optimizers by name, and the fused backward pass: the same update as the plain optimizer, with at
most one parameter's gradient alive at a time."""
import pytest
import torch

from library.config import ConfigError
from library.optim import FusedBackward, build_optimizer, build_scheduler
from library.tiny import build_tiny_sd1


def _unet_and_batches(seed=0):
    unet = build_tiny_sd1()["unet"]
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(2, 4, 8, 8, generator=g), torch.randint(0, 1000, (2,), generator=g),
                torch.randn(2, 77, 32, generator=g)) for _ in range(3)]
    return unet, batches


def _train(unet, batches, optimizer, scheduler=None):
    for x, t, ctx in batches:
        loss = (unet(x, t, ctx).sample ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler:
            scheduler.step()
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


@pytest.mark.parametrize("name, chunks", [("AdamW", None), ("Adafactor", None), ("Lion", None), ("AdamW", 3)])
def test_fused_backward_gives_the_same_weights(name, chunks):
    unet, batches = _unet_and_batches()
    start = {k: v.clone() for k, v in unet.state_dict().items()}
    plain = build_optimizer(name, [{"params": list(unet.parameters())}], 1e-3, [])
    expected = _train(unet, batches, plain, build_scheduler("cosine", plain, 1, 3))
    unet.load_state_dict(start)
    fused = FusedBackward(name, [{"params": list(unet.parameters())}], 1e-3, [], chunks=chunks)
    got = _train(unet, batches, fused, build_scheduler("cosine", fused, 1, 3))
    fused.remove_hooks()
    worst = max((got[k] - expected[k]).abs().max().item() for k in got)
    assert worst < 1e-6, worst  # same math, different summation order at most
    assert any((got[k] - start[k]).abs().max() > 1e-4 for k in got)  # it trained


def test_fused_backward_keeps_one_gradient_alive():
    unet, batches = _unet_and_batches()
    params = list(unet.parameters())
    fused = FusedBackward("Adafactor", [{"params": params}], 1e-3, [])
    peak = []
    fused.gradient_watchers.append(lambda piece: peak.append(sum(p.grad.numel() for p in params
                                                                 if p.grad is not None)))
    _train(unet, batches, fused)
    largest = max(p.numel() for p in params)
    total = sum(p.numel() for p in params)
    assert len(peak) == 3 * len(params)  # one step per parameter per batch
    assert max(peak) == largest and largest < total / 10  # ~9% of all gradients at the worst moment
    groups = FusedBackward("AdamW", [{"params": params}], 1e-3, [], chunks=4)
    assert [sum(p.numel() for p in c) for c in groups.chunk_params] == pytest.approx([total / 4] * 4, rel=0.5)


def test_scheduler_drives_every_fused_chunk():
    unet, _ = _unet_and_batches()
    fused = FusedBackward("AdamW", [{"params": list(unet.parameters()), "lr": 2e-3}], 1e-3, [])
    scheduler = build_scheduler("linear", fused, 0, 10)
    for _ in range(5):
        scheduler.step()
    lrs = [g["lr"] for opt in fused.optimizers for g in opt.param_groups]
    assert len(lrs) == len(list(unet.parameters())) and lrs == pytest.approx([1e-3] * len(lrs))  # half of 2e-3


def test_optimizers_by_name_and_dotted_path():
    p = [torch.nn.Parameter(torch.zeros(3))]
    assert type(build_optimizer("sgdnesterov", [{"params": p}], 0.1, [])).__name__ == "SGD"
    assert build_optimizer("SGDNesterov", [{"params": p}], 0.1, []).defaults["nesterov"] is True
    assert type(build_optimizer("torch.optim.RAdam", [{"params": p}], 0.1, ["weight_decay=0.1"])).__name__ == "RAdam"
    assert type(build_optimizer("Lion8bit", [{"params": p}], 0.1, [])).__name__ == "Lion8bit"
    assert type(build_optimizer("Prodigy", [{"params": p}], 1.0, [])).__name__ == "Prodigy"
    with pytest.raises(ConfigError, match="no such optimizer"):
        build_optimizer("torch.optim.Nope", [{"params": p}], 0.1, [])


@pytest.mark.parametrize("fused", [False, True])
def test_adafactor_relative_step_picks_its_own_step_size(fused):
    """sd-scripts' Adafactor with relative_step (here the kohya_ss GUI's trailing-comma form, the true tuple
    (False,)): the rate is min(1e-2, 1/sqrt(step)) x RMS(weights) (scale_parameter), not learning_rate nor a
    group's lr; the first update of each entry is that rate times the gradient's sign."""
    from library.optim import RelativeStepSchedule

    weight = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0, 0.5]))
    args = ["relative_step=False,", "scale_parameter=False,", "warmup_init=False"]
    groups = [{"params": [weight], "lr": 5e-3}]
    optimizer = (FusedBackward("Adafactor", groups, 1e-3, args) if fused
                 else build_optimizer("Adafactor", groups, 1e-3, args))
    scheduler = build_scheduler("cosine", optimizer, 0, 10, initial_lr=1e-3)
    assert isinstance(scheduler, RelativeStepSchedule) and scheduler.get_last_lr() == [1e-3]
    (weight * torch.tensor([1.0, -1.0, 2.0, -3.0])).sum().backward()
    optimizer.step()
    scheduler.step()
    rate = 1e-2 * (14.25 / 4) ** 0.5  # 1e-2 x RMS of the weights before the step: 0.0188746
    assert weight.detach().tolist() == pytest.approx([1 - rate, -2 + rate, 3 - rate, 0.5 + rate], abs=1e-6)
    assert scheduler.get_last_lr() == [pytest.approx(rate, rel=1e-6)]  # the step's own rate, as a number


def test_adafactor_without_relative_step_uses_the_learning_rate():
    weight = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0, 0.5]))
    optimizer = build_optimizer("Adafactor", [{"params": [weight]}], 1e-3, ["relative_step=False"])
    (weight * torch.tensor([1.0, -1.0, 2.0, -3.0])).sum().backward()
    optimizer.step()
    assert weight.detach().tolist() == pytest.approx([1 - 1e-3, -2 + 1e-3, 3 - 1e-3, 0.5 + 1e-3], abs=1e-6)
