"""The planner sees fp8_base, blocks_to_swap and cpu_offload_checkpointing: on a FLUX.1 whose blocks are
wide enough to dominate the weights (the tiny FLUX, transformer widened to 256), each switch lowers its
category by what it should."""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from library.block_swap import spread
from library.config import NetworkSection
from library.planner import plan, switch_text
from library.planner.step import StepSettings


@pytest.fixture(scope="module")
def wide_flux(tiny_flux, tmp_path_factory):
    folder = tmp_path_factory.mktemp("arch") / "wide-flux"
    shutil.copytree(tiny_flux["folder"], folder)
    config_path = folder / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config.update(num_attention_heads=16, num_layers=2, num_single_layers=4)  # width 16 x 16 = 256
    config_path.write_text(json.dumps(config))
    return StepSettings(recipe="network", family="flux", arch=str(folder), width=64, height=64, batch_size=1,
                        mixed_precision="bf16", gradient_checkpointing=True, cache_latents=True,
                        cache_text_encoder_outputs=True, train_text_encoder=False,
                        network=NetworkSection(network_dim=4, network_alpha=2.0))


def _blocks_bytes(s, count):
    """bf16 bytes of each swappable block of the arch, and of the `count` the swapper picks."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(s.arch, subfolder="transformer"))
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    sizes = [2 * sum(p.numel() for p in b.parameters()) for b in blocks]
    # sd-scripts' count: count // 2 double blocks, (count - count // 2) * 2 single blocks, each kind spread
    doubles, singles = len(model.transformer_blocks), len(model.single_transformer_blocks)
    chosen = [*spread(doubles, count // 2), *(doubles + k for k in spread(singles, (count - count // 2) * 2))]
    return sizes, [sizes[k] for k in chosen], 2 * sum(p.numel() for p in model.parameters())


def test_offload_switches_lower_their_categories(wide_flux):
    base = plan(wide_flux)
    sizes, swapped, denoiser = _blocks_bytes(wide_flux, 2)  # 1 of the 2 double blocks, 2 of the 4 single
    assert base.breakdown["weights"] == pytest.approx(denoiser, rel=0.02)  # the denoiser, bf16; text/VAE cached

    fp8 = plan(dataclasses.replace(wide_flux, fp8_base=True))  # Linear weights (nearly all) 2 -> 1 byte
    saved = base.breakdown["weights"] - fp8.breakdown["weights"]
    assert saved == pytest.approx(denoiser / 2, rel=0.05)

    swap = dataclasses.replace(wide_flux, blocks_to_swap=2)
    swapped_plan = plan(swap)
    saved = base.breakdown["weights"] - swapped_plan.breakdown["weights"]
    # at the peak at most two swapped blocks are on the device (the one running, the one prefetched)
    two_largest = sum(sorted(swapped)[-2:])
    assert sum(swapped) - two_largest <= saved <= sum(swapped), (saved, swapped)
    assert any("blocks_to_swap 2" in n and "s/step" in n for n in swapped_plan.notes)
    assert "blocks_to_swap=2" in switch_text(swap)

    offload = plan(dataclasses.replace(wide_flux, cpu_offload_checkpointing=True))
    assert offload.breakdown["activations"] < 0.7 * base.breakdown["activations"]
    assert offload.breakdown["weights"] == base.breakdown["weights"]


def test_full_fine_tune_block_swap_moves_weights_and_state(wide_flux):
    db = dataclasses.replace(wide_flux, recipe="db", optimizer_type="Adafactor", fused_backward_pass=True,
                             full_bf16=True)
    plain, swapped = plan(db), plan(dataclasses.replace(db, blocks_to_swap=2))
    sizes, chosen, _ = _blocks_bytes(db, 2)
    saved = plain.breakdown["weights"] - swapped.breakdown["weights"]
    assert sum(chosen) - sum(sorted(chosen)[-2:]) <= saved <= sum(chosen)
    assert swapped.breakdown["optimizer state"] < plain.breakdown["optimizer state"]
    assert swapped.device_peak < plain.device_peak and swapped.card_peak <= plain.card_peak
