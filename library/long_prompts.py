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


def weighted(parts) -> bool:
    """Whether captions are weighted ("(word:1.2)", sd-scripts' weighted_captions)."""
    return bool(getattr(parts.source, "weighted_captions", False)) if parts.source is not None else False


def windows(parts) -> int:
    """How many 75-token windows a caption gets: max_token_length // 75 (1 when unset)."""
    length = getattr(parts.source, "max_token_length", None) if parts.source is not None else None
    return (length or WINDOW) // WINDOW


def window_ids(tokenizer, captions: list[str], n: int) -> torch.Tensor:
    """(batch * n, 77) token ids: each caption's n windows, in order."""
    ids = tokenizer(captions, padding="max_length", max_length=n * WINDOW + 2, truncation=True,
                    return_tensors="pt").input_ids
    return _split(ids, n, tokenizer.eos_token_id, tokenizer.pad_token_id)


def caption_ids(tokenizer, captions: list[str], n: int, weighted: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(batch * n, 77) ids of the captions in n windows (n = 1: one 77-token sequence), and with `weighted`
    (weighted_captions, library/prompt_weights.py) each token's weight, else None."""
    if not weighted:
        if n > 1:
            return window_ids(tokenizer, captions, n), None
        return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids, None
    from library.prompt_weights import weighted_batch

    ids, weights = weighted_batch(tokenizer, captions, n * WINDOW + 2)
    if n == 1:
        return ids, weights
    chunks = torch.stack([torch.cat([weights[:, :1], weights[:, 1 + i * WINDOW: 1 + (i + 1) * WINDOW],
                                     weights[:, -1:]], dim=1) for i in range(n)], dim=1)
    return _split(ids, n, tokenizer.eos_token_id, tokenizer.pad_token_id), chunks.reshape(-1, WINDOW + 2)


def weigh(states: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """(batch * n, 77, d) states times each token's weight (weighted_captions); unchanged without weights."""
    return states if weights is None else states * weights.to(states.device, states.dtype).unsqueeze(-1)


def _split(ids: torch.Tensor, n: int, eos: int, pad: int) -> torch.Tensor:
    """(batch, n * 75 + 2) ids -> (batch * n, 77): BOS, 75 tokens, the last token; EOS fixed up where pad != eos."""
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
