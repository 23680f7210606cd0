"""Tiny tokenizers of the real classes, with tiny vocabularies, built locally (no download): CLIP, T5, Qwen's
and Mistral's, with the special tokens and chat templates the pipelines use."""
from __future__ import annotations

import json
from pathlib import Path


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP byte-level BPE alphabet: one printable character per byte value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def tiny_clip_tokenizer(folder: Path, merges_words=("the", "dog", "photo", "red", "blue")):
    """A real CLIPTokenizer with a tiny vocabulary: the byte alphabet, word-end forms, a few merges."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_alphabet()
    vocab, merges = chars + [c + "</w>" for c in chars], []
    for word in merges_words:  # merge left to right: "t h", "th e</w>"
        piece = word[0]
        for i, ch in enumerate(word[1:], start=1):
            last = i == len(word) - 1
            right = ch + ("</w>" if last else "")
            merges.append(f"{piece} {right}")
            piece = piece + right
            if piece not in vocab:
                vocab.append(piece)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    for name in ("vocab.json", "merges.txt"):
        (folder / name).unlink()
    return tokenizer


def tiny_t5_tokenizer(words=("a", "photo", "of", "the", "dog", "red", "blue", "green", "yellow", "circle",
                             "square")):
    """A real T5TokenizerFast over a tiny unigram model (built with `tokenizers`: no sentencepiece file, no
    download): <pad> 0, </s> 1, <unk> 2, then the words and the single letters, each with and without the
    word-start mark; every text ends with </s>, as T5's does."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -1.0) for w in words]
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    pieces += [("\u2581", -3.0)] + [(c, -5.0) for c in letters] + [("\u2581" + c, -5.0) for c in letters]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=512)


QWEN_CHAT_TEMPLATE = (  # Qwen3's chat format, as Flux2KleinPipeline renders a prompt (enable_thinking=False)
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}")


MISTRAL_CHAT_TEMPLATE = (  # Mistral-Small-3's chat format, as Flux2Pipeline renders a prompt (system, user turns)
    "{{ bos_token }}{% for m in messages %}{% if m['content'] is string %}{% set text = m['content'] %}{% else %}"
    "{% set text = m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{% endif %}{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]{% elif m['role'] == 'user' %}"
    "[INST]{{ text }}[/INST]{% else %}{{ text }}{{ eos_token }}{% endif %}{% endfor %}")


def _byte_bpe():
    """A byte-level BPE `tokenizers` model over the byte alphabet, without merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(_byte_alphabet())}, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def tiny_qwen_tokenizer():
    """A real Qwen2TokenizerFast (Qwen3's tokenizer class) over the byte alphabet with no merges, Qwen's special
    tokens (<|endoftext|> pads, <|im_start|> / <|im_end|> frame the chat turns) and a chat template of Qwen3's
    format; built with `tokenizers`, no download."""
    from transformers import Qwen2TokenizerFast

    tokenizer = Qwen2TokenizerFast(tokenizer_object=_byte_bpe(), unk_token=None, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", model_max_length=512)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def tiny_qwen3_tokenizer(merges_words=("the", "dog", "photo", "red", "blue")):
    """A real Qwen2 tokenizer (byte-level BPE, as Qwen3's) over the byte alphabet and a few merges, with Qwen's
    special tokens (<|endoftext|> pads, <|im_start|> / <|im_end|> frame chat turns) and a chat template that
    renders one user turn as Qwen3's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    vocab = {c: i for i, c in enumerate(_byte_alphabet())}
    merges = []
    for word in merges_words:
        piece = word[0]
        for ch in word[1:]:
            merges.append((piece, ch))
            piece += ch
            vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = Qwen2TokenizerFast(tokenizer_object=tok, bos_token=None, unk_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"],
                                   model_max_length=512)
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def tiny_mistral_tokenizer():
    """A byte-level tokenizer with Mistral-Small-3's special tokens ([SYSTEM_PROMPT], [INST], ... and [IMG], the
    image token of the vision tower) and a chat template of its format."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_byte_bpe(), bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", model_max_length=512)
    tokenizer.add_special_tokens({"additional_special_tokens": ["[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]",
                                                                "[/INST]", "[IMG]"]})
    tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
    return tokenizer


QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>")


def tiny_qwen25vl_tokenizer(words=("the", "photo", "of", "a", "dog", "red", "blue", "green", "yellow", "circle",
                            "square", "image", "Describe", "system", "user", "assistant")):
    """A real Qwen2TokenizerFast (byte-level BPE with Qwen2's pre-tokenizer) over a tiny vocabulary: the byte
    alphabet, merges of a few words (with and without their leading space), and Qwen2.5-VL's chat and vision
    special tokens (padding with <|endoftext|>, as Qwen2.5-VL's tokenizer)."""
    from transformers import Qwen2TokenizerFast

    alphabet = _byte_alphabet()
    vocab, merges = {c: i for i, c in enumerate(alphabet)}, []
    for word in words:
        for text in (word, "\u0120" + word):  # the byte-level form of " word"
            piece = text[0]
            for ch in text[1:]:
                merges.append((piece, ch))
                piece += ch
                vocab.setdefault(piece, len(vocab))
    tokenizer = Qwen2TokenizerFast(vocab=vocab, merges=list(dict.fromkeys(merges)), unk_token=None,
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]))
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    tokenizer.model_max_length = 32768
    return tokenizer
