"""EMA of the adapter weights in train_network.py (network_args use_ema, ema_decay): the `-ema` file beside each
saved adapter follows shadow_n = d · shadow_(n-1) + (1 - d) · weight_n, read from the per-step files alone, and a
resumed run writes the same EMA as the uninterrupted one."""
import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file

DECAY = 0.75


def _cfg(make_config, **sections):
    base = {"network": {"network_args": ["use_ema=True", f"ema_decay={DECAY}"]},
            "optimizer": {"learning_rate": 1e-2}, "train": {"max_train_steps": 4},
            "save": {"save_every_n_steps": 1, "save_state": True}}
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return make_config(**base)


def test_ema_file_follows_the_recursion_and_survives_resume(make_config, tmp_path):
    from train_network import train

    whole = train(_cfg(make_config, train={"output_name": "whole"}))
    out = tmp_path / "out"
    weights = [load_file(out / f"whole-step{n:08d}.safetensors") for n in (1, 2, 3)] + [load_file(whole.adapter_path)]
    ema = [load_file(out / f"whole-step{n:08d}-ema.safetensors") for n in (1, 2, 3)] + [
        load_file(out / "whole-ema.safetensors")]
    assert ema[0].keys() == weights[0].keys()
    ups = [k for k in weights[0] if k.endswith("lora_up.weight")]
    for key in ups:  # lora_up starts at zero: shadow_1 = (1 - d) · weight_1
        torch.testing.assert_close(ema[0][key], (1 - DECAY) * weights[0][key], rtol=1e-5, atol=1e-8)
    moved = 0
    for n in range(1, 4):
        for key in weights[n]:
            if key.endswith(".alpha"):
                continue
            expected = DECAY * ema[n - 1][key] + (1 - DECAY) * weights[n][key]
            torch.testing.assert_close(ema[n][key], expected, rtol=1e-5, atol=1e-7, msg=f"step {n + 1} {key}")
            moved += not torch.equal(weights[n][key], weights[n - 1][key])
    assert moved > 0 and any(not torch.equal(ema[3][k], weights[3][k]) for k in ups)
    with safe_open(str(out / "whole-ema.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_ema_decay"] == f"{DECAY:g}"
    assert json.loads(meta["ss_network_args"]).get("algo") in (None, "lora")

    resumed = train(_cfg(make_config, train={"output_name": "resumed"},
                         save={"resume": str(out / "whole-step00000002-state"), "save_every_n_steps": None,
                               "save_state": False}))
    assert resumed.losses == whole.losses[2:]
    a, b = load_file(out / "whole-ema.safetensors"), load_file(out / "resumed-ema.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
