"""Qwen-Image on the tiny Qwen-Image-architecture model: the shipped architectures, the split-file layouts against
diffusers' converters, loading (folder, and ComfyUI's transformer / text_encoder / vae files), the text path of
the VL encoder against QwenImagePipeline, golden losses of adapter and full fine-tune runs, the same losses with
cached text outputs and with block swap, the adapter in diffusers, samples, and Edit pairs (control images)."""
import pytest
import torch
from safetensors.torch import load_file

from library.families import get_family
from library.families.base import Components, ModelSource
from library.families.qwen_image import TEMPLATE, QwenImageFamily, prefix_length
from library.loading import CheckpointError, arch_dir
from model_checks import assert_same_weights

# Cached text outputs and swapped blocks move or reuse tensors, never change them (see test_memory_offload.SAME)
SAME = {"rel": 1e-6, "abs": 1e-9}


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    from library.tiny import save_tiny_qwen_image

    return save_tiny_qwen_image(tmp_path_factory.mktemp("models") / "tiny-qwen")


@pytest.fixture
def qwen_config(make_config, tiny_qwen):
    def make(**sections):
        sections["model"] = {"pretrained_model_name_or_path": str(tiny_qwen["folder"]), **sections.get("model", {})}
        return make_config(**sections)
    return make


def train_network(cfg):
    from train_network import train

    return train(cfg)


def train_db(cfg):
    from train_db import train

    return train(cfg)


def test_smoke(qwen_config):
    result = train_network(qwen_config())
    print(result.losses)
    result = train_db(qwen_config(optimizer={"optimizer_type": "Adafactor", "fused_backward_pass": True,
                                             "learning_rate": 1e-4, "max_grad_norm": 0.0},
                                  dreambooth={"train_text_encoder": False}, save={"overwrite": True}))
    print(result.losses)
