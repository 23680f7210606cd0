"""optimizer.offload_optimizer_state on the test accelerator (tests/fake_device.py): a full fine-tune of the tiny SD1
with the fused backward pass trains exactly as without it, its optimizer state lives in host memory between steps
(the device holds none of it between steps), a saved state resumes to the same losses, and the planner sees it."""
import gc

import pytest
import torch

import fake_device

FUSED = {"optimizer_type": "Adafactor", "fused_backward_pass": True, "learning_rate": 1e-4, "max_grad_norm": 0.0}
STEPS = {"max_train_steps": 3}


def _db(cfg):
    from train_db import train

    return train(cfg)


def _tensor_states(optimizer) -> list[torch.Tensor]:
    return [v for opt in optimizer.optimizers for state in opt.state.values() for v in state.values()
            if isinstance(v, torch.Tensor) and v.dim() > 0]


def _run(make_config, **optimizer):
    """A run's losses, its weights and optimizer state (copied to the host), where the state was, and the
    bytes it left on the device after training; the run's own tensors freed before the next run."""
    result = _db(make_config(optimizer={**FUSED, **optimizer}, train={**STEPS, "output_name": str(optimizer)},
                             dreambooth={"train_text_encoder": False}))
    if result.optimizer.host_state is not None:  # the last copies back are still in flight: a reader waits
        assert fake_device.deferred_copies() > 0
        result.optimizer.host_state.settle()
        assert fake_device.deferred_copies() == 0
    resident = fake_device.resident_bytes()
    states = _tensor_states(result.optimizer)
    out = (result.losses, {k: v.to("cpu", copy=True) for k, v in result.parts.denoiser.state_dict().items()},
           [v.to("cpu", copy=True) for v in states], [fake_device.on_device(v) for v in states], resident)
    del result, states
    gc.collect()
    return out


def test_offloaded_state_trains_the_same_and_leaves_the_device(make_config, gpu):
    losses, weights, states, on_device, resident = _run(make_config)
    off_losses, off_weights, off_states, off_on_device, off_resident = _run(make_config, offload_optimizer_state=True)
    assert off_losses == losses  # the state's moves are copies: the same computation, bit for bit
    assert all(torch.equal(off_weights[k], weights[k]) for k in weights)
    assert len(off_states) == len(states) and all(torch.equal(a, b) for a, b in zip(off_states, states))
    assert all(on_device) and not any(off_on_device)
    state_bytes = sum(v.numel() * v.element_size() for v in states)
    assert resident - off_resident == state_bytes == 3132688  # between steps the device holds no state at all


def test_saved_state_resumes_to_the_same_losses(make_config, tmp_path, gpu):
    """The state read for saving waits for the copies back (the test device defers them until waited for, so
    a stale host buffer would be saved); loaded on resume, it goes back to the host before the first step."""
    def run(name, **save):
        return _db(make_config(optimizer={**FUSED, "offload_optimizer_state": True},
                               train={"max_train_steps": 4, "output_name": name},
                               dreambooth={"train_text_encoder": False},
                               save={"save_every_n_steps": 2, "save_state": True, **save}))

    whole = run("whole")
    resumed = run("resumed", resume=str(tmp_path / "out" / "whole-step00000002-state"))
    assert resumed.losses == whole.losses[2:]
    assert not any(fake_device.on_device(v) for v in _tensor_states(resumed.optimizer))


def test_needs_the_fused_backward_pass(make_config):
    from library.config import ConfigError

    with pytest.raises(ConfigError, match="offload_optimizer_state.*fused_backward_pass"):
        _db(make_config(optimizer={"offload_optimizer_state": True}))


def test_the_plan_moves_the_state_to_host_ram(make_config):
    """The plan of the same config: the step's optimizer state on the device is one parameter's (fake tensors
    of the tiny model), and the host RAM holds all of it."""
    from library.planner import plan, settings_from_config

    def planned(**optimizer):
        cfg = make_config(optimizer={**FUSED, **optimizer}, dreambooth={"train_text_encoder": False})
        cfg.model.arch = cfg.model.pretrained_model_name_or_path
        return plan(settings_from_config(cfg, "db"))

    kept, offloaded = planned(), planned(offload_optimizer_state=True)
    state = kept.breakdown["optimizer state"]
    assert state > 0 and offloaded.breakdown["optimizer state"] < state / 10
    assert offloaded.host["optimizer state (offload_optimizer_state)"] >= state
    assert offloaded.card_peak < kept.card_peak


def test_with_block_swap_each_state_has_one_mover(flux_config, gpu):
    """Block swap brings a swapped weight's state with its block and takes it back (its own stream); the other
    weights' state goes to these host buffers (tiny FLUX.1, 3 blocks swapped): the same losses and weights as
    block swap alone, and no state on the device."""
    def run(name, **optimizer):
        return _db(flux_config(train={"gradient_checkpointing": True, "blocks_to_swap": 3, "max_train_steps": 2,
                                      "output_name": name},
                               optimizer={**FUSED, **optimizer}, dreambooth={"train_text_encoder": False}))

    swapped = run("swapped")
    both = run("both", offload_optimizer_state=True)
    assert both.losses == swapped.losses
    a, b = swapped.parts.denoiser.state_dict(), both.parts.denoiser.state_dict()
    assert all(torch.equal(a[k].to("cpu"), b[k].to("cpu")) for k in a)
    from library.block_swap import settle_all

    both.optimizer.host_state.settle()
    settle_all()
    assert not any(fake_device.on_device(v) for v in _tensor_states(both.optimizer))
