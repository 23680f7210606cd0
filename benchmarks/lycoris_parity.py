"""Our kohya files applied by LyCORIS' own modules (lycoris-lora, not a dependency of this project) on the tiny
SD1 model: max |W_lycoris - W_ours| per algorithm, each layer merged by LyCORIS from the file's tensors.

    pip install --no-deps --target /tmp/lyco lycoris-lora einops
    PYTHONPATH=/tmp/lyco python benchmarks/lycoris_parity.py

DoRA is built as LyCORIS trains the input-axis form (LoConModule(weight_decompose=True, wd_on_out=False)): its
standalone loader assumes the output axis. LoKr uses alpha = rank: lycoris-lora 4.1.3's LokrModule.get_diff_weight
applies alpha / rank twice (get_weight already scales), so with alpha != rank LyCORIS' merge differs from ComfyUI's.
"""
from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.families.base import ModelSource  # noqa: E402
from library.families.sd1 import SD1Family  # noqa: E402
from library.tiny import save_tiny_sd1  # noqa: E402
from networks import lycoris_format  # noqa: E402
from networks.settings import settings_from  # noqa: E402
from networks.targets import inject  # noqa: E402

CASES = {"dora": {"algo": "dora", "dim": 4, "alpha": 2.0, "conv_dim": 2, "conv_alpha": 1.0},
         "oft": {"algo": "oft", "dim": 4, "alpha": 1.0, "conv_dim": 8, "conv_alpha": 1.0},
         "boft": {"algo": "boft", "dim": 4, "alpha": 1.0, "conv_dim": 4, "conv_alpha": 1.0},
         "lokr_tucker": {"algo": "lokr", "dim": 2, "alpha": 2.0, "conv_dim": 2, "conv_alpha": 2.0, "factor": 4,
                         "decompose_both": True, "use_tucker": True}}


def lycoris_module(case, name, tensors, org):
    from lycoris.modules import get_module, make_module
    from lycoris.modules.locon import LoConModule

    if case != "dora":
        kind, params = get_module(tensors, name)
        return make_module(kind, params, name, org)
    t = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
    module = LoConModule(name, org, 1, t["lora_down.weight"].shape[0], float(t["alpha"]), weight_decompose=True,
                         wd_on_out=False)
    module.lora_down.weight.data.copy_(t["lora_down.weight"])
    module.lora_up.weight.data.copy_(t["lora_up.weight"])
    module.dora_scale.data.copy_(t["dora_scale"])
    return module


@torch.no_grad()
def main() -> None:
    family = SD1Family()
    base = family.load(ModelSource(str(save_tiny_sd1(Path(tempfile.mkdtemp()) / "tiny-sd1")[0])))
    g = torch.Generator().manual_seed(0)
    for case, options in CASES.items():
        parts = copy.deepcopy(base)
        settings = settings_from({"module": "lycoris.kohya", **options})
        adapted = [inject(parts.denoiser if t.component == "denoiser" else parts.text_encoders[t.component], t,
                          settings) for t in family.adapter_targets(parts)]
        for p in (p for c in adapted for p in c.parameters()):
            p.copy_(p * (1 + 0.2 * torch.randn(p.shape, generator=g)) + 0.1 * torch.randn(p.shape, generator=g))
        tensors = lycoris_format.state_dict(adapted)
        worst, count = 0.0, 0
        for component in adapted:
            layers = dict(component.adapter_layers())
            for name, (path,) in lycoris_format.layers_to_save(component):
                org = copy.deepcopy(layers[path].get_base_layer())
                theirs = lycoris_module(case, name, tensors, org).get_merged_weight(1, org.weight.shape)[0]
                layers[path].merge()
                ours = layers[path].get_base_layer().weight.clone()
                layers[path].unmerge()
                worst, count = max(worst, float((theirs.float() - ours).abs().max())), count + 1
        print(f"{case}: {count} layers, max |LyCORIS - ours| = {worst:.3g}", flush=True)


if __name__ == "__main__":
    main()
