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
# Nothing is downloaded in tests: a tokenizer missing locally is an error, not a fetch (library.loading)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# deepspeed (installed for tests/test_deepspeed.py) is imported by transformers' unwrap_model; finding no GPU it
# warns on stdout, which the CLI tests read. Told its accelerator, it says nothing.
os.environ.setdefault("DS_ACCELERATOR", "cpu")


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


# ---- the tiny DiT families (FLUX.1, FLUX.2, Chroma, Qwen-Image, Z-Image, SD3) ---------------------

# Cached text outputs and swapped blocks move or reuse tensors, never change them (see test_memory_offload.SAME)
SAME = {"rel": 1e-6, "abs": 1e-9}
# The full fine-tune the families' golden DreamBooth losses are recorded with (sections for a `*_config` fixture)
FULL_FINE_TUNE = {"optimizer": {"optimizer_type": "Adafactor", "fused_backward_pass": True, "learning_rate": 1e-4,
                                "max_grad_norm": 0.0},
                  "dreambooth": {"train_text_encoder": False}}


def close(losses, expected):
    """Golden losses: the recorded ones to 1e-5 relative."""
    return losses == pytest.approx(expected, rel=1e-5)


def train_network(cfg):
    from train_network import train

    return train(cfg)


def train_db(cfg):
    from train_db import train

    return train(cfg)


def _tiny_model(name, builder, folder, **options):
    """A session fixture `name`: library.tiny's `builder` writes the tiny model once, into models/`folder`."""
    @pytest.fixture(scope="session", name=name)
    def files(tmp_path_factory):
        import library.tiny

        return getattr(library.tiny, builder)(tmp_path_factory.mktemp("models") / folder, **options)

    return files


tiny_flux = _tiny_model("tiny_flux", "save_tiny_flux", "tiny-flux")
tiny_flux2 = _tiny_model("tiny_flux2", "save_tiny_flux2", "tiny-flux2")
tiny_flux2_dev = _tiny_model("tiny_flux2_dev", "save_tiny_flux2", "tiny-flux2-dev", dev=True)
tiny_chroma = _tiny_model("tiny_chroma", "save_tiny_chroma", "tiny-chroma")
tiny_qwen = _tiny_model("tiny_qwen", "save_tiny_qwen_image", "tiny-qwen")
tiny_zimage = _tiny_model("tiny_zimage", "save_tiny_zimage", "tiny-zimage")
tiny_sd3 = _tiny_model("tiny_sd3", "save_tiny_sd3", "tiny-sd3")


def _family_config(name, tiny, **model):
    """A fixture `name`: make_config on the folder of the tiny model `tiny` (a fixture's name: a dict of files, or
    tiny_sdxl's (folder, single file)), with `model` keys; a test's own model keys override them."""
    @pytest.fixture(name=name)
    def config(make_config, request):
        files = request.getfixturevalue(tiny)
        folder = str(files[0] if isinstance(files, tuple) else files["folder"])

        def make(**sections):
            sections["model"] = {"pretrained_model_name_or_path": folder, **model, **sections.get("model", {})}
            return make_config(**sections)

        return make

    return config


flux_config = _family_config("flux_config", "tiny_flux", t5xxl_max_token_length=16)
flux2_config = _family_config("flux2_config", "tiny_flux2")
chroma_config = _family_config("chroma_config", "tiny_chroma", t5xxl_max_token_length=16)
qwen_config = _family_config("qwen_config", "tiny_qwen")
zimage_config = _family_config("zimage_config", "tiny_zimage")
sd3_config = _family_config("sd3_config", "tiny_sd3", t5xxl_max_token_length=16)
sdxl_config = _family_config("sdxl_config", "tiny_sdxl")


def split_files_source(files, *separate, **extra):
    """A ModelSource of a tiny model's transformer file, with its `separate` files (t5xxl, ae, text_encoder, ...)
    named by their keys, and the folder's architecture and tokenizer; `extra` keys override."""
    from library.families.base import ModelSource

    return ModelSource(str(files["transformer"]), **{**{key: str(files[key]) for key in separate},
                                                     "arch": str(files["folder"]), "tokenizer": str(files["folder"]),
                                                     **extra})


def control_images(images, folder, seed, flat=False):
    """A control image for each training image (same stem), of another size than the target (resized to its
    bucket when loaded): random colours drawn from `seed`, or with `flat` one colour each."""
    import torch
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for path in sorted(p for p in images.iterdir() if p.suffix == ".png"):
        pixels = torch.rand(1 if flat else 80, 1 if flat else 96, 3, generator=g).expand(80, 96, 3)
        Image.fromarray((pixels * 255).to(torch.uint8).numpy()).save(folder / (path.stem + ".png"))
    return folder


def assert_cached_text_outputs_change_nothing(family_config):
    """Two steps with the text outputs cached give the losses of two steps encoding each batch."""
    plain = train_network(family_config(train={"max_train_steps": 2}))
    cached = train_network(family_config(train={"max_train_steps": 2, "cache_text_encoder_outputs": True},
                                         save={"overwrite": True}))
    assert cached.losses == pytest.approx(plain.losses, **SAME)


def block_swapped_run(family_config, blocks):
    """Two steps with gradient checkpointing and `blocks` swapped give the losses of the same without block swap;
    returns the swapped run."""
    plain = train_network(family_config(train={"max_train_steps": 2, "gradient_checkpointing": True}))
    swapped = train_network(family_config(train={"max_train_steps": 2, "gradient_checkpointing": True,
                                                 "blocks_to_swap": blocks}, save={"overwrite": True}))
    assert swapped.losses == pytest.approx(plain.losses, **SAME)
    return swapped


def peft_adapter_in_pipeline(family_config, pipeline_class, folder):
    """Two steps saving a peft-layout adapter, loaded into `pipeline_class` from `folder`: (the run, the file's
    tensors, the pipeline). alpha = dim: diffusers reads no alpha from a peft-layout file (scale 1)."""
    from safetensors.torch import load_file

    result = train_network(family_config(save={"save_format": "peft"}, train={"max_train_steps": 2},
                                         network={"network_dim": 4, "network_alpha": 4.0}))
    pipe = pipeline_class.from_pretrained(str(folder))
    pipe.load_lora_weights(str(result.adapter_path))
    return result, load_file(result.adapter_path), pipe


def lora_layers(*modules):
    """How many peft LoRA layers the modules hold."""
    from peft.tuners.lora import LoraLayer

    return sum(isinstance(m, LoraLayer) for module in modules for m in module.modules())


def pipeline_parts(pipe, source, text_encoders, tokenizers):
    """A diffusers pipeline's models as our Components (text encoders and tokenizers by our names)."""
    from library.families.base import Components

    return Components(denoiser=pipe.transformer, vae=pipe.vae, noise_scheduler=pipe.scheduler,
                      text_encoders=text_encoders, tokenizers=tokenizers, source=source)


def predict_caption(family, parts, latents, caption="a photo of a red circle", timestep=400.0):
    """The family's prediction for one caption at one timestep, without grad."""
    import torch

    with torch.no_grad():
        text = family.encode_prompts(parts, [caption], 1)
        return family.predict(parts, latents, torch.tensor([timestep]), text)


def assert_samples_reproducible(sample):
    """`sample(negative, seed=5)` gives a 64x64 image, the same again from its seed, another with another negative
    prompt or seed; returns the first."""
    import numpy as np

    first = sample("blurry")
    assert first.shape == (64, 64, 3) and np.array_equal(first, sample("blurry"))
    assert not np.array_equal(first, sample("")) and not np.array_equal(first, sample("blurry", seed=6))
    return first


@pytest.fixture
def config_error(tiny_data, tmp_path, capsys):
    """Runs train_network.py on a config file `name` of the `model` keys and the tiny dataset, which must exit 2
    with one line on stderr: returns (the config's path, the line)."""
    import json

    import train_network as recipe

    def run(model, name):
        config = tmp_path / name
        config.write_text("[model]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in model.items())
                          + f"\n[dataset]\ntrain_data_dir = {json.dumps(str(tiny_data))}\nresolution = 64\n"
                          + f"[train]\noutput_dir = {json.dumps(str(tmp_path / 'out'))}\n")
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            recipe.main(["--config", str(config)])
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert exit_.value.code == 2 and len(lines) == 1, lines
        return config, lines[0]

    return run


def assert_model_file_refused(config_error, path, said, **model):
    """`path` as model.pretrained_model_name_or_path (with the other `model` keys): exit 2 with one line naming the
    config, the key and the file, and saying `said` (config_error)."""
    config, line = config_error({"pretrained_model_name_or_path": str(path), **model}, "model.toml")
    assert line.startswith(f"config error: {config}: 'model.pretrained_model_name_or_path': ")
    assert said in line and str(path) in line


# ---- Anima ------------------------------------------------------------------------------------------

tiny_anima = _tiny_model("tiny_anima", "save_tiny_anima", "tiny-anima")
anima_config = _family_config("anima_config", "tiny_anima")
