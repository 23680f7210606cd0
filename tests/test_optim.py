"""Optimizers by name, and the fused backward pass: the same update as the plain optimizer, with at
most one parameter's gradient alive at a time."""
import math

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


def _lrs(scheduler, steps: int) -> list[float]:
    """The first group's rate at steps 0 .. steps-1 (before each optimizer step, as training uses it)."""
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def _sgd(lr=1.0):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_cosine_with_min_lr_ends_at_the_ratio():
    """sd-scripts' cosine_with_min_lr: warmup, then half a cosine (num_cycles 1 -> 0.5) from base to ratio * base."""
    import math

    lr = _lrs(build_scheduler("cosine_with_min_lr", _sgd(2.0), 10, 110, min_lr_ratio=0.1), 111)
    assert lr[:11:5] == pytest.approx([0.0, 1.0, 2.0])  # linear warmup over 10 steps
    half = 2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr[60] == pytest.approx(half) and half == pytest.approx(1.1)
    assert lr[35] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25))))
    assert lr[110] == pytest.approx(0.2)  # 0.1 * base at the end, not 0
    # lr_scheduler_num_cycles = 2 (a published kohya_ss command line): one whole wave, back to base at the end
    wave = _lrs(build_scheduler("cosine_with_min_lr", _sgd(2.0), 0, 100, num_cycles=2, min_lr_ratio=0.1), 101)
    assert (wave[50], wave[100]) == pytest.approx((0.2, 2.0))


def test_warmup_stable_decay_phases_at_exact_steps():
    """warmup 10, decay a fraction 0.25 of 100 steps (25, as sd-scripts reads lr_decay_steps < 1), stable 65."""
    import math

    lr = _lrs(build_scheduler("warmup_stable_decay", _sgd(1.0), 10, 100, min_lr_ratio=0.2, decay=0.25), 101)
    assert lr[0] == pytest.approx(0.2) and lr[5] == pytest.approx(0.2 + 0.8 * 0.5)  # warmup from the ratio up
    assert lr[10:75] == pytest.approx([1.0] * 65)  # stable: steps 10 .. 74
    assert lr[75] == pytest.approx(1.0) and lr[76] < 1.0  # decay starts at 100 - 25
    assert lr[85] == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 10 / 25)))
    assert lr[99] == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 24 / 25)))
    assert lr[100] == pytest.approx(0.2)
    plain = _lrs(build_scheduler("warmup_stable_decay", _sgd(1.0), 0, 40, decay=20), 41)  # unset ratio: 0
    assert plain[:21] == pytest.approx([1.0] * 21) and plain[30] == pytest.approx(0.5) and plain[40] == 0.0


def test_inverse_sqrt_and_piecewise_constant():
    lr = _lrs(build_scheduler("inverse_sqrt", _sgd(1.0), 4, 100, timescale=9), 28)
    assert lr[2] == pytest.approx(0.5) and lr[4] == pytest.approx(1.0)  # warmup, then 1/sqrt((step+shift)/timescale)
    assert lr[27] == pytest.approx(1 / math.sqrt((27 - 4 + 9) / 9))  # shift = timescale - warmup = 5
    rules = ["step_rules='1:5,0.5:10,0.1'"]  # x1 before step 5, x0.5 before step 10, then x0.1
    lr = _lrs(build_scheduler("piecewise_constant", _sgd(2.0), 0, 20, scheduler_args=rules), 12)
    assert (lr[4], lr[5], lr[9], lr[10], lr[11]) == pytest.approx((2.0, 1.0, 1.0, 0.2, 0.2))


def test_unread_schedule_arguments_are_ignored_as_in_sd_scripts():
    """lr_decay_steps with cosine_with_min_lr, a ratio with cosine: the schedule does not read them."""
    with_extra = _lrs(build_scheduler("cosine_with_min_lr", _sgd(), 0, 20, min_lr_ratio=0.5, decay=0.5), 21)
    assert with_extra == pytest.approx(_lrs(build_scheduler("cosine_with_min_lr", _sgd(), 0, 20, min_lr_ratio=0.5), 21))
    assert _lrs(build_scheduler("cosine", _sgd(), 0, 20, min_lr_ratio=0.5), 21)[20] == pytest.approx(0.0)


def _schedule_config(tmp_path, keys: dict):
    from library.config_files import config_from_dict

    (tmp_path / "data").mkdir(exist_ok=True)
    return config_from_dict({"model": {"pretrained_model_name_or_path": str(tmp_path)},
                             "dataset": {"train_data_dir": str(tmp_path / "data")},
                             "train": {"output_dir": str(tmp_path / "out")}, "optimizer": keys}, source="c.toml")


@pytest.mark.parametrize("keys, message", [
    ({"lr_scheduler": "cosine_with_min_lr", "lr_scheduler_min_lr_ratio": -0.1},
     "'optimizer.lr_scheduler_min_lr_ratio' is the lowest rate as a fraction of the base rate: from 0 to 1, got -0.1"),
    ({"lr_scheduler": "warmup_stable_decay", "lr_scheduler_min_lr_ratio": 1.5}, "from 0 to 1, got 1.5"),
    ({"lr_scheduler": "cosine_with_min_lr"}, "needs 'optimizer.lr_scheduler_min_lr_ratio'"),
    ({"lr_scheduler": "warmup_stable_decay", "lr_decay_steps": -5}, "'optimizer.lr_decay_steps' = -5: a step"),
    ({"lr_scheduler": "warmup_stable_decay", "lr_decay_steps": 1.5}, "'optimizer.lr_decay_steps' = 1.5: a step"),
    ({"lr_scheduler": "warmup_stable_decay", "lr_warmup_steps": 0.5, "lr_decay_steps": 900},
     "'optimizer.lr_decay_steps' (900) and 'optimizer.lr_warmup_steps' (800) are longer than the run (1600 steps)"),
    ({"lr_scheduler": "inverse_sqrt", "lr_scheduler_timescale": 0}, "'optimizer.lr_scheduler_timescale' must be at"),
    ({"lr_scheduler": "piecewise_constant"}, "needs its rules in 'optimizer.lr_scheduler_args'"),
])
def test_bad_schedule_values_are_config_errors(keys, message, tmp_path):
    with pytest.raises(ConfigError) as e:
        _schedule_config(tmp_path, keys)
    assert message in str(e.value)


def test_schedule_values_that_fit_load(tmp_path):
    o = _schedule_config(tmp_path, {"lr_scheduler": "warmup_stable_decay", "lr_decay_steps": 0.2,
                                    "lr_scheduler_min_lr_ratio": 0.1, "lr_scheduler_timescale": 7}).optimizer
    assert (o.lr_decay_steps, o.lr_scheduler_min_lr_ratio, o.lr_scheduler_timescale) == (0.2, 0.1, 7)


def test_negative_ratio_stops_the_cli_with_one_line(tmp_path):
    import subprocess
    import sys

    (tmp_path / "data").mkdir()
    config = tmp_path / "c.toml"
    config.write_text(f'[model]\npretrained_model_name_or_path = "{tmp_path}"\n[dataset]\ntrain_data_dir = '
                      f'"{tmp_path / "data"}"\n[train]\noutput_dir = "{tmp_path / "out"}"\n[optimizer]\n'
                      f'lr_scheduler = "cosine_with_min_lr"\nlr_scheduler_min_lr_ratio = -0.1\n')
    run = subprocess.run([sys.executable, "train_network.py", "--config_file", str(config)], capture_output=True,
                         text=True, timeout=120)
    errors = [line for line in run.stderr.splitlines() if line.startswith("config error:")]
    assert run.returncode == 2 and len(errors) == 1, run.stderr[-2000:]
    assert "'optimizer.lr_scheduler_min_lr_ratio'" in errors[0] and "got -0.1" in errors[0]
    assert not (tmp_path / "out").exists()
