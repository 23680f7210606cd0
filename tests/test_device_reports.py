"""What GPU users of every peer expect (issue 15, "Also"): a GPU out-of-memory error that names the phase and
what to try, and the peak device memory of each phase, shown on the test accelerator (tests/fake_device.py)."""
import re

import pytest
import torch

import fake_device
from goldens import GOLDEN_SD1

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 23.65 GiB total capacity)"


def _raise_oom(*args, **kwargs):  # noqa: ARG001
    raise torch.OutOfMemoryError(OOM)


def _prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle --d 3 --s 2\n")
    return str(path)


@pytest.mark.parametrize("phase, module, name", [
    ("caching", "library.data.cache", "cache_latents"),
    ("training", "library.training", "batch_loss"),
    ("sampling", "library.sampling", "vae_tile"),
    ("saving", "networks.files", "save"),
])
def test_out_of_memory_names_the_phase(make_config, tmp_path, monkeypatch, capsys, phase, module, name):
    """A CUDA out-of-memory error is one line naming the phase it happened in and pointing to --plan /
    --vram_budget and expandable_segments; exit code 2 (the settings do not fit the GPU), no traceback."""
    import importlib

    from library import cli
    from train_network import train

    monkeypatch.setattr(importlib.import_module(module), name, _raise_oom)
    cfg = make_config(dataset={"cache_latents": True},
                      sample={"sample_prompts": _prompts(tmp_path), "sample_at_first": True})
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped, cli.exit_on_user_error():
        train(cfg)
    assert stopped.value.code == cli.EXIT_CONFIG_ERROR
    err = capsys.readouterr().err.strip().splitlines()  # (the loaders' progress bars above it)
    assert "Traceback" not in "".join(err)
    assert err[-1:] == [f"out of GPU memory while {phase}: {OOM}. see what each switch saves with --plan (or "
                   f"--vram_budget GB for the switches that fit), and set "
                   f"PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True against fragmentation"]


def _bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def test_peak_memory_per_phase(make_config, tmp_path, capsys, gpu):
    """The end of a run reports each phase's peak device memory (allocated / reserved), read from the device's
    counters and reset between phases: caching held the VAE and not the denoiser, training held the denoiser."""
    from library import phases
    from train_network import train

    result = train(make_config(dataset={"cache_latents": True},
                               sample={"sample_prompts": _prompts(tmp_path), "sample_at_first": True}))
    peaks = phases.peaks()
    assert list(peaks) == ["loading", "caching", "sampling", "training", "saving"]
    parts = result.parts
    vae, denoiser = _bytes(parts.vae), _bytes(parts.denoiser)
    assert vae <= peaks["caching"].allocated < vae + denoiser  # the denoiser came after caching (not before)
    assert denoiser <= peaks["training"].allocated
    assert peaks["training"].allocated > peaks["saving"].allocated >= denoiser  # no activations while saving
    assert all(p.reserved == p.allocated for p in peaks.values())  # the test device has no caching allocator
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("done:"))
    numbers = r"[\d.]+ / [\d.]+ GiB"
    assert re.search(rf"peak GPU memory \(allocated / reserved\): loading {numbers}, caching {numbers}, sampling "
                     rf"{numbers}, training {numbers}, saving {numbers}", line), line
    assert phases.for_trackers()["memory/training/allocated_gib"] == peaks["training"].allocated / 2**30


def test_torch_compile_trains_as_uncompiled(make_config):
    """torch_compile / dynamo_backend (sd-scripts' keys): the denoiser's repeated blocks are compiled in place
    (diffusers' _repeated_blocks: SD1's transformer blocks) and train to the golden losses of the uncompiled
    run, within the 1e-5 relative of tests/test_train_sd1.py: aot_eager traces forward and backward
    (AOTAutograd) and runs the traced graphs with the CPU's own kernels, so only the order of float operations
    may differ (inductor, the default, generates kernels: a GPU check, benchmarks/gpu_check.py)."""
    backend = "aot_eager"
    from train_network import train

    result = train(make_config(train={"torch_compile": True, "dynamo_backend": backend}))
    compiled = [m for m in result.parts.denoiser.modules() if m._compiled_call_impl is not None]
    blocks = [m for m in result.parts.denoiser.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert compiled == blocks and len(blocks) == 7
    assert result.losses == pytest.approx(GOLDEN_SD1, rel=1e-5)


def test_xformers_that_does_not_import_is_refused(make_config, tmp_path, monkeypatch):
    """A real xformers check: installed but not importable (built for another PyTorch: the usual case after a
    torch upgrade) is refused with one line naming the key and the import error, before any model loads."""
    from library.config import ConfigError
    from library.config_files import config_from_dict

    package = tmp_path / "site" / "xformers"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "ops.py").write_text("raise ImportError('xFormers was built for PyTorch 2.5.1+cu121')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for name in ("xformers", "xformers.ops"):
        monkeypatch.delitem(__import__("sys").modules, name, raising=False)
    raw = make_config().to_toml_dict()
    raw["train"]["xformers"] = True
    with pytest.raises(ConfigError, match=r"'train.xformers' = true but xformers does not import \(xFormers was "
                                          r"built for PyTorch 2.5.1\+cu121\): install the build made for this"):
        config_from_dict(raw, source="test.toml", check_paths=True)


def test_attention_backend_is_reported(make_config, monkeypatch, capsys):
    """The run says once which attention it uses and, for SDPA on CUDA, which kernels PyTorch may pick."""
    from library.memory import sdpa_kernels
    from train_network import train

    train(make_config(train={"max_train_steps": 1}))
    said = [x for x in capsys.readouterr().out.splitlines() if "attention sdpa" in x]
    assert len(said) == 1 and "attention sdpa (CPU kernels)" in said[0]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: False)
    assert sdpa_kernels() == " (CUDA kernels: flash, memory-efficient, math; flash needs fp16 / bf16)"
