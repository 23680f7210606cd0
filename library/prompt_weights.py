"""sd-scripts' weighted_captions: "(word:1.2)" prompt weighting of SD1 / SD2 / SDXL captions.

The grammar users know from A1111 and sd-scripts: "(text)" multiplies its weight by 1.1, "[text]" divides it by
1.1, "(text:1.5)" multiplies it by 1.5; brackets nest (their factors multiply), an opening bracket left open
applies to the rest of the caption, a closing one with nothing open is plain text, and "\\(", "\\)", "\\[",
"\\]", "\\\\" are the literal characters. Each piece of text is tokenized on its own and its tokens carry its
weight; the text encoder's output state of each token is multiplied by that weight (BOS, EOS and padding by 1),
as sd-scripts' encode_tokens_with_weights does.
"""
from __future__ import annotations

import re

import torch

ROUND, SQUARE = 1.1, 1 / 1.1
_EXPLICIT = re.compile(r":\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)")


def parse_weighted(text: str) -> list[tuple[str, float]]:
    """[(text, weight), ...]: the caption's pieces, neighbours of the same weight joined."""
    pieces: list[list] = []
    rounds: list[int] = []
    squares: list[int] = []
    i = 0
    while i < len(text):
        char, explicit = text[i], _EXPLICIT.match(text, i)
        if char == "\\":
            literal = text[i + 1: i + 2]
            pieces.append([literal if literal in "()[]\\" else "", 1.0])
            i += 2 if literal in "()[]\\" and literal else 1
            continue
        if char == "(":
            rounds.append(len(pieces))
        elif char == "[":
            squares.append(len(pieces))
        elif explicit and rounds:
            _scale(pieces, rounds.pop(), float(explicit.group(1)))
            i = explicit.end()
            continue
        elif char == ")" and rounds:
            _scale(pieces, rounds.pop(), ROUND)
        elif char == "]" and squares:
            _scale(pieces, squares.pop(), SQUARE)
        else:
            pieces.append([char, 1.0])
        i += 1
    for start in rounds:
        _scale(pieces, start, ROUND)
    for start in squares:
        _scale(pieces, start, SQUARE)
    return _joined(pieces)


def _scale(pieces: list[list], start: int, factor: float) -> None:
    for piece in pieces[start:]:
        piece[1] *= factor


def _joined(pieces: list[list]) -> list[tuple[str, float]]:
    out: list[list] = []
    for text, weight in pieces:
        if out and out[-1][1] == weight:
            out[-1][0] += text
        else:
            out.append([text, weight])
    return [(text, weight) for text, weight in out] or [("", 1.0)]


def weighted_ids(tokenizer, caption: str, length: int) -> tuple[list[int], list[float]]:
    """`length` token ids (BOS, the pieces' tokens cut to length - 2, EOS, padding) and each token's weight."""
    ids: list[int] = []
    weights: list[float] = []
    for text, weight in parse_weighted(caption):
        tokens = tokenizer(text).input_ids[1:-1]
        ids += tokens
        weights += [weight] * len(tokens)
    ids, weights = ids[: length - 2], weights[: length - 2]
    pad = length - 2 - len(ids)
    return ([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * pad,
            [1.0, *weights, 1.0] + [1.0] * pad)


def weighted_batch(tokenizer, captions: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, length) ids and weights of the captions."""
    rows = [weighted_ids(tokenizer, caption, length) for caption in captions]
    return torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows], dtype=torch.float32)
