"""Tiny models of the real architectures, with random weights, and a small generated dataset.

Tests and the quickstart train these on a CPU. They are saved exactly as real models are distributed
(a diffusers folder, and a single file in the original layout), so loading them runs the same code a
real checkpoint goes through.

    python -m library.tiny sd1 quickstart/tiny-sd1      # folder + quickstart/tiny-sd1.safetensors
    python -m library.tiny sdxl out/tiny-sdxl           # folder + out/tiny-sdxl.safetensors (SAI layout)
    python -m library.tiny sd3 out/tiny-sd3             # folder + SAI single files + separate clip_l/clip_g/t5xxl
    python -m library.tiny flux-dev out/tiny-flux       # folder + BFL transformer + clip_l / t5xxl / ae files (= flux)
    python -m library.tiny flux-schnell out/tiny-schnell   # the same without the guidance input
    python -m library.tiny chroma out/tiny-chroma          # folder + Chroma transformer + t5xxl / ae files
    python -m library.tiny flux2 out/tiny-flux2            # FLUX.2 klein: folder + BFL transformer + text_encoder / ae
    python -m library.tiny flux2-dev out/tiny-flux2-dev    # FLUX.2 dev (Mistral3 text encoder, guidance input)
    python -m library.tiny qwen_image out/tiny-qwen        # folder + ComfyUI's transformer / text_encoder / vae files
    python -m library.tiny zimage out/tiny-zimage          # folder + Z-Image transformer + text_encoder / ae files
    python -m library.tiny anima out/tiny-anima            # modular-pipeline folder + DiT / text_encoder / vae files
    python -m library.tiny data quickstart/data         # 8 images with .txt captions
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "clip_sample": False,
             "steps_offset": 1, "prediction_type": "epsilon"}


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


def build_tiny_sd1(seed: int = 0, v2: bool = False):
    """The parts of a tiny SD1-architecture pipeline (3-level U-Net, 4-level VAE, 3-layer CLIP).
    v2: the SD2 variant (linear attention projections, per-level head counts, OpenCLIP-style gelu
    text encoder saved in the OpenCLIP single-file layout)."""
    import tempfile

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = tiny_clip_tokenizer(Path(tmp))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4, 4) if v2 else 4, norm_num_groups=32,
        use_linear_projection=v2)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4, norm_num_groups=32, sample_size=64, scaling_factor=0.18215)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu" if v2 else "quick_gelu",
        projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                scheduler=DDPMScheduler(**SCHEDULER))


def save_tiny_sd1(folder: str | Path, seed: int = 0, v2: bool = False) -> tuple[Path, Path]:
    """Write `folder` (diffusers layout) and `folder`.safetensors (original single-file layout)."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    from library.ldm_layout import pipeline_to_ldm

    folder = Path(folder)
    parts = build_tiny_sd1(seed, v2)
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(folder))
    state = pipeline_to_ldm(parts["unet"].state_dict(), dict(parts["unet"].config), parts["vae"].state_dict(),
                            parts["text_encoder"].state_dict(), "open_clip" if v2 else "clip")
    single = folder.with_suffix(".safetensors")
    save_file({k: v.contiguous() for k, v in state.items()}, str(single))
    return folder, single


def build_tiny_sdxl(seed: int = 0):
    """The parts of a tiny SDXL-architecture pipeline: a 3-level U-Net laid out as SDXL's (no attention
    on the first level, 2 resnets per level, transformer depth growing with the level, linear
    projections, "text_time" size/pooled-text embedding), the 4-level VAE, CLIP-L-style and
    OpenCLIP-bigG-style (gelu, projection) text encoders of different widths, and their tokenizers
    (the second pads with "!", as SDXL's tokenizer_2 does)."""
    import tempfile

    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = tiny_clip_tokenizer(Path(tmp))
        tokenizer.save_pretrained(tmp)
        tokenizer_2 = CLIPTokenizer.from_pretrained(tmp, pad_token="!")
    torch.manual_seed(seed)
    te1_width, te2_width, time_dim = 32, 64, 8
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4), norm_num_groups=32,
        cross_attention_dim=te1_width + te2_width, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=te2_width + 6 * time_dim)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4, norm_num_groups=32, sample_size=64, scaling_factor=0.13025, force_upcast=True)
    ids = dict(vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=te1_width, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        hidden_act="quick_gelu", projection_dim=te1_width, **ids))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=te2_width, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        hidden_act="gelu", projection_dim=te2_width, **ids))
    scheduler = EulerDiscreteScheduler(**{k: v for k, v in SCHEDULER.items() if k != "clip_sample"},
                                       timestep_spacing="leading")
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                tokenizer=tokenizer, tokenizer_2=tokenizer_2, scheduler=scheduler)


def save_tiny_sdxl(folder: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write `folder` (diffusers layout) and `folder`.safetensors (SAI single-file layout)."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    from library.ldm_layout import sdxl_pipeline_to_ldm

    folder = Path(folder)
    parts = build_tiny_sdxl(seed)
    StableDiffusionXLPipeline(**parts).save_pretrained(str(folder))
    state = sdxl_pipeline_to_ldm(parts["unet"].state_dict(), dict(parts["unet"].config), parts["vae"].state_dict(),
                                 parts["text_encoder"].state_dict(), parts["text_encoder_2"].state_dict())
    single = folder.with_suffix(".safetensors")
    save_file({k: v.contiguous() for k, v in state.items()}, str(single))
    return folder, single


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


def build_tiny_flux(seed: int = 0, guidance: bool = True):
    """The parts of a tiny FLUX.1-architecture pipeline: a FluxTransformer2DModel with 2 double and 2 single
    blocks (16-channel latents packed 2x2, RoPE axes summing to the head dim; guidance embedding for the dev
    variant), the 4-level 16-channel VAE without quant convs (scaling and shift factors as FLUX's), a CLIP-L-
    style text encoder and a T5 encoder (gated-gelu, as T5 v1.1), with their tokenizers."""
    import tempfile

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = tiny_clip_tokenizer(Path(tmp))
    tokenizer_2 = tiny_t5_tokenizer()
    torch.manual_seed(seed)
    clip_width, t5_width = 32, 48
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=t5_width, pooled_projection_dim=clip_width,
        guidance_embeds=guidance, axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=16, norm_num_groups=32, sample_size=64, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False, force_upcast=True)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=clip_width, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=clip_width,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=t5_width, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=8, relative_attention_max_distance=16,
        dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                tokenizer=tokenizer, tokenizer_2=tokenizer_2, scheduler=scheduler)


def save_tiny_flux(folder: str | Path, seed: int = 0, guidance: bool = True) -> dict[str, Path]:
    """Write `folder` (diffusers layout) and the files users have: `folder`.safetensors (the BFL transformer),
    `folder`-clip_l.safetensors, `folder`-t5xxl.safetensors and `folder`-ae.safetensors (original VAE layout)."""
    from diffusers import FluxPipeline
    from safetensors.torch import save_file

    from library.flux_layout import transformer_to_bfl
    from library.ldm_layout import VAE_PREFIX, vae_to_ldm

    folder = Path(folder)
    parts = build_tiny_flux(seed, guidance)
    FluxPipeline(**parts).save_pretrained(str(folder))
    files = {"folder": folder, "transformer": folder.with_suffix(".safetensors")}
    clip = {("" if k.startswith("text_model.") else "text_model.") + k: v
            for k, v in parts["text_encoder"].state_dict().items()}
    ae = {k[len(VAE_PREFIX):]: v for k, v in vae_to_ldm(parts["vae"].state_dict()).items()}
    for name, state in (("transformer", transformer_to_bfl(parts["transformer"].state_dict())), ("clip_l", clip),
                        ("t5xxl", {k: v for k, v in parts["text_encoder_2"].state_dict().items()
                                   if k != "encoder.embed_tokens.weight"}), ("ae", ae)):  # tied to shared.weight
        path = files.get(name) or folder.with_name(f"{folder.name}-{name}.safetensors")
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        files[name] = path
    return files


def build_tiny_chroma(seed: int = 0):
    """The parts of a tiny Chroma-architecture pipeline: a ChromaTransformer2DModel with 2 double and 2 single
    blocks and a 2-layer approximator (the FLUX.1 widths of build_tiny_flux), FLUX.1's tiny 16-channel VAE and
    T5 encoder with its tokenizer (Chroma has no CLIP-L)."""
    from diffusers import ChromaTransformer2DModel

    flux = build_tiny_flux(seed, guidance=False)
    torch.manual_seed(seed + 1)
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=flux["text_encoder_2"].config.d_model, axes_dims_rope=(4, 6, 6),
        approximator_num_channels=16, approximator_hidden_dim=32, approximator_layers=2)
    return dict(transformer=transformer, vae=flux["vae"], text_encoder=flux["text_encoder_2"],
                tokenizer=flux["tokenizer_2"], scheduler=flux["scheduler"])


def save_tiny_chroma(folder: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write `folder` (diffusers layout) and the files users have: `folder`.safetensors (the Chroma transformer,
    library.chroma_layout), `folder`-t5xxl.safetensors and `folder`-ae.safetensors (original VAE layout)."""
    from diffusers import ChromaPipeline
    from safetensors.torch import save_file

    from library.chroma_layout import transformer_to_file
    from library.ldm_layout import VAE_PREFIX, vae_to_ldm

    folder = Path(folder)
    parts = build_tiny_chroma(seed)
    ChromaPipeline(**parts).save_pretrained(str(folder))
    files = {"folder": folder, "transformer": folder.with_suffix(".safetensors")}
    ae = {k[len(VAE_PREFIX):]: v for k, v in vae_to_ldm(parts["vae"].state_dict()).items()}
    t5 = {k: v for k, v in parts["text_encoder"].state_dict().items() if k != "encoder.embed_tokens.weight"}
    for name, state in (("transformer", transformer_to_file(parts["transformer"].state_dict())), ("t5xxl", t5),
                        ("ae", ae)):
        path = files.get(name) or folder.with_name(f"{folder.name}-{name}.safetensors")
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        files[name] = path
    return files


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


def _tiny_flux2_text_encoder(tokenizer, width: int, dev: bool):
    """klein: a Qwen3ForCausalLM of 28 layers (its hidden states 9, 18, 27 are read); dev: a
    Mistral3ForConditionalGeneration (Mistral language model of 31 layers: 10, 20, 30 are read; a one-layer Pixtral
    vision tower)."""
    from transformers import (MistralConfig, Mistral3Config, Mistral3ForConditionalGeneration, PixtralVisionConfig,
                              Qwen3Config, Qwen3ForCausalLM)

    shape = dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=32, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=8, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id)
    if not dev:
        return Qwen3ForCausalLM(Qwen3Config(num_hidden_layers=28, tie_word_embeddings=True, **shape))
    vision = PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 head_dim=8, image_size=28, patch_size=14)
    return Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=MistralConfig(num_hidden_layers=31, **shape), vision_config=vision,
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2))


def build_tiny_flux2(seed: int = 0, dev: bool = False):
    """The parts of a tiny FLUX.2-architecture pipeline: a Flux2Transformer2DModel with 2 double and 2 single
    blocks (128 input channels: the 32-channel latents patchified 2x2; four RoPE axes; the guidance input for dev,
    none for klein), the 4-level 32-channel AutoencoderKLFlux2 with its latent batch-norm statistics (seeded, not the
    identity), and the text encoder with its tokenizer (klein: Qwen3; dev: Mistral-Small-3-style Mistral3): the
    transformer's text width is 3x the encoder's, three hidden states stacked."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    tokenizer = tiny_mistral_tokenizer() if dev else tiny_qwen_tokenizer()
    torch.manual_seed(seed)
    width = 16
    transformer = Flux2Transformer2DModel(
        in_channels=128, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=3 * width, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=dev)
    vae = AutoencoderKLFlux2(block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=32,
                             norm_num_groups=32, sample_size=64)
    vae.bn.running_mean.copy_(torch.randn(128) * 0.1)
    vae.bn.running_var.copy_(torch.rand(128) + 0.5)
    text_encoder = _tiny_flux2_text_encoder(tokenizer, width, dev)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def save_tiny_flux2(folder: str | Path, seed: int = 0, dev: bool = False) -> dict[str, Path]:
    """Write `folder` (diffusers layout: Flux2KleinPipeline, or Flux2Pipeline for dev) and the files users have:
    `folder`.safetensors (the BFL transformer, library.flux2_layout), `folder`-text_encoder.safetensors (the
    language model alone, as ComfyUI's text_encoders/ files: no lm_head, no vision tower) and `folder`-ae.safetensors
    (the VAE in the original layout, with its bn. statistics)."""
    from diffusers import Flux2KleinPipeline, Flux2Pipeline
    from safetensors.torch import save_file

    from library.flux2_layout import transformer_to_file
    from library.ldm_layout import VAE_PREFIX, vae_to_ldm

    folder = Path(folder)
    parts = build_tiny_flux2(seed, dev)
    (Flux2Pipeline if dev else Flux2KleinPipeline)(**parts).save_pretrained(str(folder))
    files = {"folder": folder, "transformer": folder.with_suffix(".safetensors")}
    vae_state = parts["vae"].state_dict()
    ae = {k[len(VAE_PREFIX):]: v for k, v in vae_to_ldm({k: v for k, v in vae_state.items()
                                                         if not k.startswith("bn.")}).items()}
    ae.update({k: v for k, v in vae_state.items() if k.startswith("bn.")})
    text = {k: v for k, v in parts["text_encoder"].state_dict().items()
            if not k.startswith(("lm_head.", "model.vision_tower.", "model.multi_modal_projector."))}
    for name, state in (("transformer", transformer_to_file(parts["transformer"].state_dict())),
                        ("text_encoder", text), ("ae", ae)):
        path = files.get(name) or folder.with_name(f"{folder.name}-{name}.safetensors")
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        files[name] = path
    return files


def build_tiny_zimage(seed: int = 0):
    """The parts of a tiny Z-Image-architecture pipeline: a ZImageTransformer2DModel with 2 main layers and one
    noise / one context refiner (2x2 patches of 16-channel latents, RoPE axes summing to the head dim), FLUX.1's
    tiny 16-channel VAE (Z-Image uses FLUX.1's autoencoder), a 3-layer Qwen3 text encoder (grouped-query attention,
    q/k norms) whose width is the transformer's caption width, and its tokenizer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    flux = build_tiny_flux(seed, guidance=False)
    tokenizer = tiny_qwen3_tokenizer()
    torch.manual_seed(seed + 2)
    text_width = 32
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=text_width, axes_dims=[8, 12, 12], axes_lens=[1024, 64, 64])
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    return dict(transformer=transformer, vae=flux["vae"], text_encoder=text_encoder, tokenizer=tokenizer,
                scheduler=scheduler)


def save_tiny_zimage(folder: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write `folder` (diffusers layout) and ComfyUI's split files: `folder`.safetensors (the transformer in the
    original layout, library.zimage_layout), `folder`-text_encoder.safetensors (Qwen3 as ComfyUI's
    qwen_3_4b.safetensors: transformers' causal-LM names, `model.` prefix) and `folder`-ae.safetensors."""
    from diffusers import ZImagePipeline
    from safetensors.torch import save_file

    from library.ldm_layout import VAE_PREFIX, vae_to_ldm
    from library.zimage_layout import transformer_to_original

    folder = Path(folder)
    parts = build_tiny_zimage(seed)
    ZImagePipeline(**parts).save_pretrained(str(folder))
    files = {"folder": folder, "transformer": folder.with_suffix(".safetensors")}
    ae = {k[len(VAE_PREFIX):]: v for k, v in vae_to_ldm(parts["vae"].state_dict()).items()}
    qwen = {"model." + k: v for k, v in parts["text_encoder"].state_dict().items()}
    for name, state in (("transformer", transformer_to_original(parts["transformer"].state_dict())),
                        ("text_encoder", qwen), ("ae", ae)):
        path = files.get(name) or folder.with_name(f"{folder.name}-{name}.safetensors")
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        files[name] = path
    return files


def build_tiny_sd3(seed: int = 0):
    """The parts of a tiny SD3-architecture pipeline: an SD3Transformer2DModel with 2 joint blocks (the first with
    SD3.5-medium's second image attention, q/k RMS norm as SD3.5, the last one's context stream pre-only), the
    4-level 16-channel VAE without quant convs (SD3's scaling and shift factors), CLIP-L- and CLIP-G-style text
    encoders with projections (different widths; their penultimate states, concatenated, are narrower than T5's
    as in SD3) and a T5 encoder, with their tokenizers (tokenizer_2 pads with "!", as SD3's does)."""
    import tempfile

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = tiny_clip_tokenizer(Path(tmp))
        tokenizer.save_pretrained(tmp)
        tokenizer_2 = CLIPTokenizer.from_pretrained(tmp, pad_token="!")
    tokenizer_3 = tiny_t5_tokenizer()
    torch.manual_seed(seed)
    clip_l, clip_g, t5_width = 32, 48, 96
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=t5_width, caption_projection_dim=16,
        pooled_projection_dim=clip_l + clip_g, pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=16, norm_num_groups=32, sample_size=64, scaling_factor=1.5305, shift_factor=0.0609,
        use_quant_conv=False, use_post_quant_conv=False, force_upcast=True)
    ids = dict(vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=clip_l, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, hidden_act="quick_gelu",
        projection_dim=clip_l, **ids))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=clip_g, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, hidden_act="gelu",
        projection_dim=clip_g, **ids))
    text_encoder_3 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_3), d_model=t5_width, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=8, relative_attention_max_distance=16,
        dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                text_encoder_3=text_encoder_3, tokenizer=tokenizer, tokenizer_2=tokenizer_2, tokenizer_3=tokenizer_3,
                scheduler=scheduler)


def save_tiny_sd3(folder: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write `folder` (diffusers layout) and the files users have: `folder`.safetensors (SAI layout: transformer,
    VAE and the three text encoders, as sd3_medium_incl_clips_t5xxlfp16.safetensors), `folder`-transformer.safetensors
    (transformer and VAE only, as sd3_medium.safetensors) and the separate `folder`-clip_l / -clip_g / -t5xxl files."""
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import save_file

    from library.sd3_layout import SAI_PREFIX, transformer_to_sai
    from library.ldm_layout import vae_to_ldm

    folder = Path(folder)
    parts = build_tiny_sd3(seed)
    StableDiffusion3Pipeline(**parts).save_pretrained(str(folder))
    encoders = {"clip_l": dict(parts["text_encoder"].state_dict()),
                "clip_g": dict(parts["text_encoder_2"].state_dict()),
                "t5xxl": {k: v for k, v in parts["text_encoder_3"].state_dict().items()
                          if k != "encoder.embed_tokens.weight"}}  # tied to shared.weight
    model = {SAI_PREFIX + k: v for k, v in transformer_to_sai(parts["transformer"].state_dict()).items()}
    model.update(vae_to_ldm(parts["vae"].state_dict()))
    everything = dict(model)
    for name, state in encoders.items():
        everything.update({f"text_encoders.{name}.transformer.{k}": v for k, v in state.items()})
    files = {"folder": folder, "single": folder.with_suffix(".safetensors"),
             "transformer": folder.with_name(f"{folder.name}-transformer.safetensors")}
    for name, state in (("single", everything), ("transformer", model), *encoders.items()):
        path = files.get(name) or folder.with_name(f"{folder.name}-{name}.safetensors")
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        files[name] = path
    return files


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


def tiny_qwen_vl(tokenizer, width: int = 32):
    """A tiny Qwen2.5-VL-architecture model (Qwen2_5_VLForConditionalGeneration: a 2-layer language model with
    grouped-query attention and M-RoPE, a 1-block vision tower), its token ids those of `tokenizer`."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"))}
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, rms_norm_eps=1e-6,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
                         bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=width,
                           fullatt_block_indexes=[0], window_size=112, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        **ids)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def build_tiny_qwen_image(seed: int = 0, edit_2511: bool = False):
    """The parts of a tiny Qwen-Image-architecture pipeline: a QwenImageTransformer2DModel with 2 dual-stream
    blocks (16-channel latents packed 2x2, RoPE axes summing to the head dim; with `edit_2511`, Edit-2511's
    zero-timestep modulation of the reference tokens), the Qwen-Image (Wan-2.1-type, 3D causal) VAE at a small
    width with its 16 latent means and deviations, the tiny Qwen2.5-VL model and its tokenizer, and Qwen-Image's
    scheduler (dynamic shift, 0.5 at 256 to 0.9 at 8192 tokens)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    from library.loading import read_json

    tokenizer = tiny_qwen25vl_tokenizer()
    torch.manual_seed(seed)
    text_encoder = tiny_qwen_vl(tokenizer)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=text_encoder.config.text_config.hidden_size, axes_dims_rope=(4, 6, 6),
        zero_cond_t=edit_2511)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                 temperal_downsample=[False, True, True])
    arch = Path(__file__).parent / "arch" / "qwen-image" / "scheduler" / "scheduler_config.json"
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(read_json(arch))
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                scheduler=scheduler)


def save_tiny_qwen_image(folder: str | Path, seed: int = 0, edit_2511: bool = False) -> dict[str, Path]:
    """Write `folder` (diffusers layout, QwenImagePipeline) and the split files ComfyUI users have:
    `folder`.safetensors (the transformer, ComfyUI's diffusion_models file), `folder`-text_encoder.safetensors
    (Qwen2.5-VL in the layout of ComfyUI's text_encoders/qwen_2.5_vl_7b.safetensors) and `folder`-vae.safetensors
    (the Wan-2.1 layout of ComfyUI's vae/qwen_image_vae.safetensors)."""
    from diffusers import QwenImagePipeline
    from safetensors.torch import save_file

    from library.qwen_image_layout import text_model_to_file, vae_to_file

    folder = Path(folder)
    parts = build_tiny_qwen_image(seed, edit_2511)
    QwenImagePipeline(**parts).save_pretrained(str(folder))
    files = {"folder": folder, "transformer": folder.with_suffix(".safetensors")}
    for name, state in (("transformer", parts["transformer"].state_dict()),
                        ("text_encoder", text_model_to_file(parts["text_encoder"].state_dict())),
                        ("vae", vae_to_file(parts["vae"].state_dict()))):
        path = files.get(name) or folder.with_name(f"{folder.name}-{name}.safetensors")
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        files[name] = path
    return files


def build_tiny_anima(seed: int = 0) -> dict:
    """The parts of a tiny Anima: a CosmosTransformer3DModel with 2 blocks (2 heads of 16, adaLN-LoRA width 8,
    Anima's RoPE scales and padding-mask channel, no learnable position embedding), the LLM adapter
    (AnimaTextConditioner: 2 blocks, 4 heads, the tiny T5 vocabulary, outputs padded to 512 tokens as Anima's), a
    2-layer Qwen3 whose width is the adapter's source width, the Qwen-Image VAE at a small width with its 16 latent
    means and deviations, both tokenizers, and Anima's scheduler (shift 3.0)."""
    from diffusers import (AnimaTextConditioner, AutoencoderKLQwenImage, CosmosTransformer3DModel,
                           FlowMatchEulerDiscreteScheduler)
    from transformers import Qwen3Config, Qwen3Model

    from library.loading import arch_dir, read_json

    tokenizer, t5_tokenizer = tiny_qwen3_tokenizer(), tiny_t5_tokenizer()
    torch.manual_seed(seed)
    width = 32
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True))
    conditioner = AnimaTextConditioner(source_dim=width, target_dim=width, model_dim=width, num_layers=2,
                                       num_attention_heads=4, target_vocab_size=len(t5_tokenizer))
    transformer = CosmosTransformer3DModel(
        in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        text_embed_dim=width, adaln_lora_dim=8, rope_scale=(1.0, 4.0, 4.0), extra_pos_embed_type=None)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                 temperal_downsample=[False, True, True],
                                 **{k: read_json(arch_dir("anima") / "vae" / "config.json")[k]
                                    for k in ("latents_mean", "latents_std")})
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        read_json(arch_dir("anima") / "scheduler" / "scheduler_config.json"))
    return dict(transformer=transformer, text_conditioner=conditioner, vae=vae, text_encoder=text_encoder,
                tokenizer=tokenizer, t5_tokenizer=t5_tokenizer, scheduler=scheduler)


def save_tiny_anima(folder: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write `folder` (AnimaModularPipeline's layout) and the split files ComfyUI users have: `folder`.safetensors
    (the DiT with the LLM adapter, `net.` names: diffusion_models/anima-*.safetensors), `folder`-text_encoder
    (Qwen3 with causal-LM names, as text_encoders/qwen_3_06b_base.safetensors) and `folder`-vae (the Wan-2.1
    layout of vae/qwen_image_vae.safetensors)."""
    from diffusers import AnimaAutoBlocks
    from safetensors.torch import save_file

    from library.anima_layout import transformer_to_file
    from library.qwen_image_layout import vae_to_file

    folder = Path(folder)
    parts = build_tiny_anima(seed)
    pipe = AnimaAutoBlocks().init_pipeline()
    pipe.update_components(**parts)
    pipe.save_pretrained(str(folder), overwrite_modular_index=True)
    dit = {**parts["transformer"].state_dict(),
           **{"text_conditioner." + k: v for k, v in parts["text_conditioner"].state_dict().items()}}
    files = {"folder": folder, "transformer": folder.with_suffix(".safetensors")}
    for name, state in (("transformer", transformer_to_file(dit)),
                        ("text_encoder", {"model." + k: v for k, v in parts["text_encoder"].state_dict().items()}),
                        ("vae", vae_to_file(parts["vae"].state_dict()))):
        path = files.get(name) or folder.with_name(f"{folder.name}-{name}.safetensors")
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        files[name] = path
    return files


COLORS = {"red": (220, 40, 40), "blue": (40, 60, 220), "green": (40, 180, 60), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square")


def make_dataset(folder: str | Path, size: int = 64, seed: int = 0) -> Path:
    """Eight images of a colored shape on a plain background, each with a .txt caption."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (color, shape) in enumerate((c, s) for c in COLORS for s in SHAPES):
        image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(180, 255, 3)))
        draw = ImageDraw.Draw(image)
        lo, hi = int(size * 0.2), int(size * 0.8)
        (draw.ellipse if shape == "circle" else draw.rectangle)([lo, lo, hi, hi], fill=COLORS[color])
        image.save(folder / f"{i:02d}_{color}_{shape}.png")
        (folder / f"{i:02d}_{color}_{shape}.txt").write_text(f"a photo of a {color} {shape}", encoding="utf-8")
    return folder


# what `python -m library.tiny` builds: every family by its name (sd2 and the FLUX.1 variants too), and the data
WHAT = ("sd1", "sd2", "sdxl", "sd3", "flux", "flux-dev", "flux-schnell", "chroma", "flux2", "flux2-dev", "qwen_image",
        "zimage", "anima", "data")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=WHAT)
    parser.add_argument("out")
    args = parser.parse_args(argv)
    if args.what in ("sd1", "sd2"):
        written = save_tiny_sd1(args.out, v2=args.what == "sd2")
    elif args.what == "sdxl":
        written = save_tiny_sdxl(args.out)
    elif args.what == "sd3":
        written = tuple(save_tiny_sd3(args.out).values())
    elif args.what == "chroma":
        written = tuple(save_tiny_chroma(args.out).values())
    elif args.what.startswith("flux2"):
        written = tuple(save_tiny_flux2(args.out, dev=args.what == "flux2-dev").values())
    elif args.what == "qwen_image":
        written = tuple(save_tiny_qwen_image(args.out).values())
    elif args.what == "zimage":
        written = tuple(save_tiny_zimage(args.out).values())
    elif args.what == "anima":
        written = tuple(save_tiny_anima(args.out).values())
    elif args.what.startswith("flux"):
        written = tuple(save_tiny_flux(args.out, guidance=args.what != "flux-schnell").values())
    else:
        written = (make_dataset(args.out),)
    print("wrote " + ", ".join(str(p) for p in written))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
