"""Assertions about loaded models, and the trained-looking adapters, that several test files make."""
import copy

import torch

from library.families.sd1 import SD1Family
from networks import files
from networks.targets import inject


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


# ---- ComfyUI's reading of kohya files ---------------------------------------------------------------------------


def comfy_lora_names(state, prefix=""):
    """ComfyUI's map of lora_unet_ keys: "lora_unet_" + the name of each weight of the model's own (original-layout)
    state dict, `prefix` removed and dots as underscores -> that weight's key."""
    return {"lora_unet_" + k.removeprefix(prefix).removesuffix(".weight").replace(".", "_"): k
            for k in state if k.endswith(".weight")}


def comfy_lora_applied(tensors, original, prefix=""):
    """The kohya `tensors` applied to the original-layout state dict `original` (in place) as ComfyUI applies
    lora_unet_ keys: each layer finds its weight by comfy_lora_names and W += alpha / rank * up @ down. Returns the
    layers' names."""
    by_name = comfy_lora_names(original, prefix)
    layers = {k.split(".", 1)[0] for k in tensors}
    assert layers <= set(by_name)
    for name in layers:
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        original[by_name[name]] += float(tensors[f"{name}.alpha"]) / down.shape[0] * (up @ down)
    return layers


# ---- trained-looking adapters ------------------------------------------------------------------------------


def inject_adapters(family, parts, settings, components=None):
    """The adapters of `settings` injected at `family`'s adapter targets in `parts` (those of `components` only,
    when given), one adapted component each, as training makes them."""
    return [inject(parts.denoiser if t.component == "denoiser" else parts.text_encoders[t.component], t, settings)
            for t in family.adapter_targets(parts) if components is None or t.component in components]


def randomise_adapters(adapted, seed=0, relative=0.0):
    """Trained-looking adapter weights (peft starts at a zero delta, which would prove nothing): each weight
    scaled by 1 + relative * N(0, 1) where `relative` is given, then shifted by 0.1 * N(0, 1), drawn from `seed`."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (p for c in adapted for p in c.parameters()):
            scaled = p * (1 + relative * torch.randn(p.shape, generator=g)) if relative else p
            p.copy_(scaled + 0.1 * torch.randn(p.shape, generator=g))


def saved_sd1_adapter(base_parts, settings, save_format, path):
    """A copy of the SD1 `base_parts` with randomised adapters of `settings`, saved to `path` in `save_format` with
    the metadata of a one-step run: (parts, adapted, path)."""
    parts = copy.deepcopy(base_parts)
    adapted = inject_adapters(SD1Family(), parts, settings)
    randomise_adapters(adapted)
    tensors, extra = files.adapter_tensors(adapted, save_format, torch.float32)
    meta = files.metadata({"ss_base_model_version": "sd_v1"}, files.network_metadata(settings), _one_step_run())
    files.save(path, tensors, {**meta, **extra})
    return parts, adapted, path


def _one_step_run():
    return {"started_at": 0, "output_name": "t", "learning_rate": 1e-4, "unet_lr": None, "text_encoder_lr": None,
            "steps": 1, "epoch": 1, "max_train_steps": 1, "seed": 1, "mixed_precision": "no", "clip_skip": 1,
            "num_images": 1, "resolution": [64, 64], "tag_frequency": {}, "prediction_type": "epsilon"}
