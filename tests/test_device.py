"""The runs on the test accelerator (tests/fake_device.py), a device distinct from the host: the golden losses
of every family hold on it, nothing is left on the wrong side, and what stays resident is counted."""
import pytest

import fake_device
from test_flux import GOLDEN_FLUX, GOLDEN_FLUX_DB
from test_flux2 import GOLDEN_FLUX2, GOLDEN_FLUX2_DB
from test_sd3 import GOLDEN_SD3
from test_sdxl import GOLDEN_SDXL, GOLDEN_SDXL_DB, sdxl_config  # noqa: F401
from test_train_sd1 import GOLDEN


def _close(losses, expected):
    return losses == pytest.approx(expected, rel=1e-5)


def train_network(cfg):
    from train_network import train

    return train(cfg)


def train_db(cfg):
    from train_db import train

    return train(cfg)


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
    assert _close(result.losses, GOLDEN) and _on_device(result)


def test_golden_losses_sdxl_lora_and_full_fine_tune(sdxl_config, gpu):
    assert _close(train_network(sdxl_config()).losses, GOLDEN_SDXL)
    result = train_db(sdxl_config(optimizer={"optimizer_type": "Adafactor", "fused_backward_pass": True,
                                             "learning_rate": 1e-4, "max_grad_norm": 0.0},
                                  train={"output_name": "db"}))
    assert _close(result.losses, GOLDEN_SDXL_DB) and _on_device(result)


def test_golden_losses_sd3(sd3_config, gpu):
    result = train_network(sd3_config())
    assert _close(result.losses, GOLDEN_SD3) and _on_device(result)


def test_golden_losses_flux_lora_and_full_fine_tune(flux_config, gpu):
    assert _close(train_network(flux_config()).losses, GOLDEN_FLUX)
    result = train_db(flux_config(optimizer={"optimizer_type": "Adafactor", "fused_backward_pass": True,
                                             "learning_rate": 1e-4, "max_grad_norm": 0.0},
                                  dreambooth={"train_text_encoder": False}, train={"output_name": "db"}))
    assert _close(result.losses, GOLDEN_FLUX_DB) and _on_device(result)


def test_golden_losses_flux2_lora_and_full_fine_tune(flux2_config, gpu):
    """FLUX.2 klein on the test device: its golden losses, and the text encoder's stacked hidden states, the
    patchified latents and the 4-axis position ids made where the transformer runs."""
    assert _close(train_network(flux2_config()).losses, GOLDEN_FLUX2)
    result = train_db(flux2_config(optimizer={"optimizer_type": "Adafactor", "fused_backward_pass": True,
                                              "learning_rate": 1e-4, "max_grad_norm": 0.0},
                                   dreambooth={"train_text_encoder": False}, train={"output_name": "db"}))
    assert _close(result.losses, GOLDEN_FLUX2_DB) and _on_device(result)


def test_golden_losses_zimage_lora_and_full_fine_tune(zimage_config, gpu):
    """Issue 15, section 1: Z-Image's golden losses on the test device. Its RoPE multiplies complex tensors, whose
    backward multiplies by a lazy conjugate view: the test device looped forever copying it (a crash) until it
    resolved the view's conjugate / negative bit in its own copy."""
    from conftest import FULL_FINE_TUNE
    from test_zimage import GOLDEN_ZIMAGE, GOLDEN_ZIMAGE_DB

    assert _close(train_network(zimage_config()).losses, GOLDEN_ZIMAGE)
    result = train_db(zimage_config(**FULL_FINE_TUNE, train={"output_name": "db"}))
    assert _close(result.losses, GOLDEN_ZIMAGE_DB) and _on_device(result)


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


@pytest.mark.parametrize("family", ["chroma", "qwen", "anima"])
def test_golden_losses_chroma_qwen_anima_lora_and_full_fine_tune(family, request, gpu):
    """Issue 15, section 1: the golden losses of the families added after the test device, on it."""
    from conftest import FULL_FINE_TUNE

    module = __import__({"chroma": "test_chroma", "qwen": "test_qwen_image", "anima": "test_anima"}[family])
    name = {"qwen": "QWEN"}.get(family, family.upper())
    make = request.getfixturevalue(f"{family}_config")
    assert _close(train_network(make()).losses, getattr(module, f"GOLDEN_{name}"))
    result = train_db(make(**FULL_FINE_TUNE, train={"output_name": "db"}))
    assert _close(result.losses, getattr(module, f"GOLDEN_{name}_DB")) and _on_device(result)
