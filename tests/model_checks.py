"""Assertions about loaded models that several test files make."""
import torch


def part_states(parts) -> dict[str, dict[str, torch.Tensor]]:
    """Every part's state dict: denoiser, vae and each text encoder by its name."""
    return {"denoiser": parts.denoiser.state_dict(), "vae": parts.vae.state_dict(),
            **{name: te.state_dict() for name, te in parts.text_encoders.items()}}


def assert_same_weights(a, b) -> None:
    """Two loads of a model hold the same parts, keys and tensors, bit for bit."""
    sa, sb = part_states(a), part_states(b)
    assert sa.keys() == sb.keys()
    for name, state in sa.items():
        assert state.keys() == sb[name].keys(), name
        for key in state:
            assert torch.equal(state[key], sb[name][key]), f"{name}.{key}"
