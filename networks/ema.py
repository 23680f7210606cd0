"""EMA of the adapter weights (network_args `use_ema=True`, `ema_decay=0.999`): after every optimizer step
shadow ← decay · shadow + (1 - decay) · weight, for every trainable adapter parameter, kept in float32 on the
parameters' device (adapters are small). The recipe saves the averaged adapter beside the trained one as
`<name>-ema.safetensors` (same layout and metadata, plus `ss_ema_decay`), as train_db.py names its EMA model;
its state rides in the resumable training state."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class AdapterEMA:
    def __init__(self, params: list[nn.Parameter], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay = {decay} must be in (0, 1)")
        self.params, self.decay = list(params), decay
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for shadow, param in zip(self.shadow, self.params):
            shadow.lerp_(param.detach().float(), 1.0 - self.decay)

    @contextmanager
    def applied(self):
        """The averaged weights in the parameters for the duration (to save them), the trained ones after."""
        kept = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for shadow, param in zip(self.shadow, self.params):
                param.copy_(shadow.to(param.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for saved, param in zip(kept, self.params):
                    param.copy_(saved)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError(f"EMA state holds {len(state['shadow'])} tensors, this adapter {len(self.shadow)}")
        self.shadow = [s.to(p.device, torch.float32) for s, p in zip(state["shadow"], self.params)]
