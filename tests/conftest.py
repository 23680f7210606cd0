"""Shared fixtures: the tiny SD1 model (diffusers folder + single file) and the generated dataset,
built once per test session, and a helper to write training configs."""
from __future__ import annotations

import os
import sys
from pathlib import Path

# One thread per process: the tiny models' ops are too small to gain from more, and on the 2-core machine
# threads fight the subprocess tests and each other (a 4-step tiny SDXL run: 57 s with 2 threads under
# load, 2 s with 1). Golden losses agree to ~1e-7 between thread counts.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory) -> tuple[Path, Path]:
    """(diffusers folder, single-file .safetensors) of the tiny SD1-architecture model."""
    from library.tiny import save_tiny_sd1

    return save_tiny_sd1(tmp_path_factory.mktemp("models") / "tiny-sd1")


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory) -> tuple[Path, Path]:
    """The SD2 variant: linear projections, OpenCLIP-layout text encoder in the single file."""
    from library.tiny import save_tiny_sd1

    return save_tiny_sd1(tmp_path_factory.mktemp("models") / "tiny-sd2", v2=True)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> tuple[Path, Path]:
    """(diffusers folder, SAI-layout single file) of the tiny SDXL-architecture model."""
    from library.tiny import save_tiny_sdxl

    return save_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    from library.tiny import make_dataset

    return make_dataset(tmp_path_factory.mktemp("data") / "images")


@pytest.fixture
def make_config(tiny_sd1, tiny_data, tmp_path):
    """A validated Config for a short seeded run on the tiny model; `sections` override the defaults."""
    from library.config_files import config_from_dict

    def make(**sections):
        raw = {
            "model": {"pretrained_model_name_or_path": str(tiny_sd1[0])},
            "network": {"network_dim": 4, "network_alpha": 2.0},
            "dataset": {"train_data_dir": str(tiny_data), "resolution": 64, "train_batch_size": 2},
            "optimizer": {"learning_rate": 1e-3},
            "train": {"output_dir": str(tmp_path / "out"), "output_name": "lora", "max_train_steps": 4,
                      "seed": 7},
        }
        for name, values in sections.items():
            raw.setdefault(name, {}).update(values)
        return config_from_dict(raw, source="test.toml")

    return make


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one process-wide state (mixed precision...); each in-process run starts clean."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()


def pytest_collection_modifyitems(session, config, items):  # noqa: ARG001
    """The test device is registered before any test runs when one will use it: autograd sizes its per-device
    queues at the first backward of the process."""
    if any("gpu" in getattr(item, "fixturenames", ()) for item in items):
        import fake_device

        fake_device.load()


@pytest.fixture
def gpu():
    """The test accelerator (tests/fake_device.py, built on first use): a device distinct from the host;
    accelerate hands it out to runs started inside, as it hands out `cuda`."""
    import fake_device

    with fake_device.use() as device:
        yield device
