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


def comfy_oft(blocks, alpha, weight):
    """ComfyUI's comfy/weight_adapter/oft.py / boft.py calculate_weight: Q = B - B^T, scaled to norm alpha
    where longer (alpha > 0), R = (I + Q)(I - Q)^-1; OFT (3-d): row block k -> R_k^T W_k; BOFT (4-d): per level i the rows permuted in
    groups of (2, 2^i * b/2), row block k -> R_ik W_k, the permutation undone."""
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype)
    q = blocks - blocks.transpose(-1, -2)
    if alpha > 0:
        norm = torch.norm(q) + 1e-8
        if norm > alpha:
            q = q * alpha / norm
    r = (eye + q) @ (eye - q).float().inverse().to(q.dtype)
    _, *shape = weight.shape
    if blocks.dim() == 3:
        return torch.einsum("k n m, k n ... -> k m ...", r, weight.view(blocks.shape[0], blocks.shape[1], *shape)
                            ).reshape(-1, *shape)
    out, b = weight, blocks.shape[-1]
    for i in range(blocks.shape[0]):
        k = 2 ** i * (b // 2)
        out = out.unflatten(0, (-1, 2, k)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, b))
        out = torch.einsum("b i j, b j ...-> b i ...", r[i], out)
        out = out.flatten(0, 1).unflatten(0, (-1, k, 2)).transpose(1, 2).flatten(0, 2)
    return out


def sd1_probe(parts):
    """Text-encoder output and U-Net prediction for a fixed prompt, latent and timestep."""
    tokenizer, te = parts.tokenizers["te"], parts.text_encoders["te"]
    ids = tokenizer(["a photo of a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hidden = te(ids).last_hidden_state
        return hidden, parts.denoiser(latents, torch.tensor([500]), hidden).sample
