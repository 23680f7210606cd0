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
