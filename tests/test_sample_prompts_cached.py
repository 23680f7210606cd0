"""Sample prompts encoded once while caching (library.sampling.PromptOutputs): with cached text-encoder outputs,
sampling during training renders the same image as a run whose text encoders stay on the device, and never
brings the text encoders to the device nor runs them (test accelerator, tests/fake_device.py)."""
import pytest
import torch
from PIL import Image, ImageChops

import fake_device


def _lora(cfg):
    from train_network import train

    return train(cfg)


def _watched(monkeypatch, seen: list):
    """render_samples, watching the text encoders: each layer that runs, and where the encoders are."""
    import library.sampling as sampling

    render = sampling.render_samples

    def watching(family, parts, *args, **kwargs):
        def hook(module, args):  # noqa: ARG001
            seen.append("ran")
        handles = [layer.register_forward_pre_hook(hook) for e in parts.text_encoders.values() for layer in e.modules()
                   if list(layer.parameters(recurse=False))]
        handles.append(parts.denoiser.register_forward_pre_hook(lambda module, args: seen.extend(
            "on the device" for e in parts.text_encoders.values() if fake_device.on_device(next(e.parameters())))))
        try:
            return render(family, parts, *args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()

    monkeypatch.setattr(sampling, "render_samples", watching)


@pytest.mark.parametrize("config", ["make_config", "flux_config"])
def test_cached_prompts_render_the_same_image_without_the_encoders(config, request, tmp_path, monkeypatch, gpu):
    make = request.getfixturevalue(config)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --d 9 --s 2 --n a blue square\n")
    common = dict(sample={"sample_prompts": str(prompts), "sample_at_first": True},
                  network={"network_train_unet_only": True})
    resident = _lora(make(**common, train={"max_train_steps": 1, "output_name": "resident"}))
    seen: list = []
    _watched(monkeypatch, seen)
    cached = _lora(make(**common, train={"max_train_steps": 1, "output_name": "cached",
                                         "cache_text_encoder_outputs": True}))
    assert seen == []  # no text-encoder layer ran while sampling, none was on the device
    from library.sampling import PROMPT_OUTPUTS

    recorded = cached.parts.extra[PROMPT_OUTPUTS]
    assert len(recorded.encoders) == len(cached.parts.text_encoders) and recorded.outputs
    assert not any(fake_device.on_device(next(e.parameters())) for e in cached.parts.text_encoders.values())
    assert cached.losses == pytest.approx(resident.losses, rel=1e-6)
    first = [p for p in resident.samples if "step00000000_00" in p.name], \
        [p for p in cached.samples if "step00000000_00" in p.name]
    assert len(first[0]) == len(first[1]) == 1
    a, b = (Image.open(p[0]) for p in first)
    assert ImageChops.difference(a, b).getbbox() is None  # the same pixels
    assert torch.tensor(list(a.getdata())).float().std() > 0  # an image, not a blank
