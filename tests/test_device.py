"""The runs on the test accelerator (tests/fake_device.py), a device distinct from the host: the golden losses
of every family hold on it, nothing is left on the wrong side, and what stays resident is counted."""
import pytest

import fake_device
import goldens
from conftest import FULL_FINE_TUNE, close, train_db, train_network


def _on_device(result):
    return all(fake_device.on_device(p) for p in result.parts.denoiser.parameters())


def test_device_is_distinct_from_the_host(gpu):
    import torch

    x = torch.ones(4, device=gpu)
    assert x.device == torch.device("fakegpu", 0) and x.device != gpu  # as cuda:0 != cuda
    with pytest.raises(RuntimeError, match="same device"):
        x + torch.ones(4)
    before = fake_device.resident_bytes()
    y = torch.zeros(1024, device=gpu)
    assert fake_device.resident_bytes() == before + 4096
    del y
    assert fake_device.resident_bytes() == before


def test_runs_get_the_test_device_after_host_runs(make_config, gpu):
    """accelerate keeps the device it chose for the process: a run on the host before must not leave it."""
    from accelerate import Accelerator, PartialState

    PartialState._reset_state()
    Accelerator(cpu=True)  # a host run earlier in the session
    from fake_device import use

    with use():
        assert Accelerator().device == gpu


def test_golden_losses_sd1(make_config, gpu):
    result = train_network(make_config())
    assert close(result.losses, goldens.GOLDEN_SD1) and _on_device(result)


def test_golden_losses_sdxl_lora_and_full_fine_tune(sdxl_config, gpu):
    assert close(train_network(sdxl_config()).losses, goldens.GOLDEN_SDXL)
    result = train_db(sdxl_config(optimizer=FULL_FINE_TUNE["optimizer"], train={"output_name": "db"}))
    assert close(result.losses, goldens.GOLDEN_SDXL_DB) and _on_device(result)


def test_golden_losses_sd3(sd3_config, gpu):
    result = train_network(sd3_config())
    assert close(result.losses, goldens.GOLDEN_SD3) and _on_device(result)


@pytest.mark.parametrize("family", ["flux", "flux2", "zimage", "chroma", "qwen", "anima"])
def test_golden_losses_of_the_dits_lora_and_full_fine_tune(family, request, gpu):
    """Issue 15, section 1: each DiT family's golden losses (goldens.py) on the test device, the adapter run and
    the full fine-tune. FLUX.2 klein: the text encoder's stacked hidden states, the patchified latents and the
    4-axis position ids are made where the transformer runs. Z-Image: its RoPE multiplies complex tensors, whose
    backward multiplies by a lazy conjugate view: the test device looped forever copying it (a crash) until it
    resolved the view's conjugate / negative bit in its own copy."""
    make = request.getfixturevalue(f"{family}_config")
    name = {"qwen": "QWEN"}.get(family, family.upper())
    assert close(train_network(make()).losses, getattr(goldens, f"GOLDEN_{name}"))
    result = train_db(make(**FULL_FINE_TUNE, train={"output_name": "db"}))
    assert close(result.losses, getattr(goldens, f"GOLDEN_{name}_DB")) and _on_device(result)


def test_side_stream_copies_to_the_host_wait_for_an_event(gpu):
    """The test device's model of an asynchronous copy (tests/fake_device.py): a copy device -> host with
    non_blocking on a side stream is not done until an event recorded after it is waited for, so a host reader
    that does not wait reads the old memory; the events waited on are listed."""
    import torch

    x, host = torch.arange(6.0, device=gpu), torch.zeros(6)
    stream = torch.Stream(gpu)
    with stream:
        host.copy_(x, non_blocking=True)
    event = torch.Event(gpu)
    event.record(stream)
    (x * 2).sum()  # the compute stream goes on meanwhile
    assert host.tolist() == [0.0] * 6 and fake_device.deferred_copies() == 1  # still "running"
    before = fake_device.blocking_copies_to_host()
    event.synchronize()
    assert host.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0] and fake_device.deferred_copies() == 0
    assert fake_device.waited_events()[-1] == event.event_id and fake_device.blocking_copies_to_host() == before
    x.cpu()  # a plain copy: blocking
    assert fake_device.blocking_copies_to_host() == before + 1
