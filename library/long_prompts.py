"""Captions longer than one CLIP window: sd-scripts' max_token_length 150 / 225 for SD1 / SD2 / SDXL.

A caption is tokenized to max_token_length + 2 tokens and cut into windows of 75; each window is encoded as a
77-token sequence of its own (BOS, the 75 tokens, and the sequence's last token: EOS or padding), and the
states are joined back: the first window's BOS state, the 75 content states of every window, the last
window's final state (2 + 75 n states). Where padding is not EOS (SD2, SDXL's second encoder), a window whose
text ends inside it gets EOS as its last token, and an empty window starts with EOS, as sd-scripts writes them.
"""
from __future__ import annotations

import torch

WINDOW = 75  # tokens of text per CLIP window (77 with BOS and EOS)


def windows(parts) -> int:
    """How many 75-token windows a caption gets: max_token_length // 75 (1 when unset)."""
    length = getattr(parts.source, "max_token_length", None) if parts.source is not None else None
    return (length or WINDOW) // WINDOW


def window_ids(tokenizer, captions: list[str], n: int) -> torch.Tensor:
    """(batch * n, 77) token ids: each caption's n windows, in order."""
    ids = tokenizer(captions, padding="max_length", max_length=n * WINDOW + 2, truncation=True,
                    return_tensors="pt").input_ids
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    chunks = []
    for i in range(n):
        chunk = torch.cat([ids[:, :1], ids[:, 1 + i * WINDOW: 1 + (i + 1) * WINDOW], ids[:, -1:]], dim=1)
        if pad != eos:
            chunk[(chunk[:, -2] != eos) & (chunk[:, -2] != pad), -1] = eos
            chunk[chunk[:, 1] == pad, 1] = eos
        chunks.append(chunk)
    return torch.stack(chunks, dim=1).reshape(-1, WINDOW + 2)


def join_windows(states: torch.Tensor, n: int) -> torch.Tensor:
    """(batch * n, 77, d) window states -> (batch, 2 + 75 n, d) caption states."""
    per_caption = states.reshape(-1, n, WINDOW + 2, states.shape[-1])
    body = per_caption[:, :, 1:-1].reshape(per_caption.shape[0], n * WINDOW, states.shape[-1])
    return torch.cat([per_caption[:, 0, :1], body, per_caption[:, -1, -1:]], dim=1)


def first_window(pooled: torch.Tensor, n: int) -> torch.Tensor:
    """(batch * n, d) pooled outputs -> (batch, d): the first window's, as sd-scripts conditions SDXL on."""
    return pooled[::n]
