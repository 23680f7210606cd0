"""A quantized frozen base (model.base_model_precision = int8 / nf4, QLoRA through bitsandbytes): seeded tiny
LoRA runs of SD1 and FLUX.1 within a stated tolerance of the unquantized base's golden losses, the adapters in
full precision over bitsandbytes layers, the saved adapter reloading to the trained weights, the quantized state
placed where the run puts it on the test device, and the refusals."""
import pytest
import torch

from conftest import train_network
from goldens import GOLDEN_FLUX, GOLDEN_QWEN, GOLDEN_SD1, GOLDEN_ZIMAGE
from library.config import ConfigError


def _bnb_layers(module, precision):
    import bitsandbytes as bnb

    kind = bnb.nn.Linear8bitLt if precision == "int8" else bnb.nn.Linear4bit
    return [m for m in module.modules() if isinstance(m, kind)]


# Tolerances, measured when written (4 seeded steps, fp32 compute): int8 (LLM.int8: int8 weights with a scale per
# row, int8 activations with outlier columns in fp16) moves the tiny runs' losses by 1.1e-4 (SD1) and 5e-4 (FLUX.1)
# of themselves; nf4 (4-bit codes, ~3 significant bits) by 6.6e-3 (SD1) and 2.3e-2 (FLUX.1). Each run is pinned
# too (bitsandbytes' CPU kernels: 2e-3 for other CPUs), and must differ from the unquantized run (the base was
# quantized at all).
NEAR = {"int8": 1e-3, "nf4": 4e-2}
GOLDEN_SD1_Q = {"int8": [1.021592, 1.195188, 1.198294, 1.111079], "nf4": [1.020074, 1.187161, 1.202112, 1.112238]}
GOLDEN_FLUX_Q = {"int8": [0.491583, 0.851442, 0.774627, 0.529237], "nf4": [0.480149, 0.845747, 0.769474, 0.517036]}


def _check_losses(losses, unquantized, pinned, precision):
    assert losses == pytest.approx(pinned, rel=2e-3)
    assert losses == pytest.approx(unquantized, rel=NEAR[precision])
    assert losses != pytest.approx(unquantized, rel=1e-6)


def _adapter_params(adapted) -> dict:
    return {f"{i}.{n}": p.detach() for i, c in enumerate(adapted) for n, p in c.module.named_parameters()
            if p.requires_grad}


@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_sd1_qlora_losses_layers_reload_and_samples(make_config, tiny_sd1, tmp_path, precision):
    from library.families import ModelSource
    from library.families.sd1 import SD1Family
    from networks import files
    from networks.settings import NetworkSettings
    from networks.targets import inject

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --d 3 --s 2\n")
    result = train_network(make_config(model={"base_model_precision": precision},
                               sample={"sample_prompts": str(prompts)}))
    _check_losses(result.losses, GOLDEN_SD1, GOLDEN_SD1_Q[precision], precision)
    parts = result.parts
    for module in [parts.denoiser, *parts.text_encoders.values()]:  # every Linear quantized, none left plain
        plain = [n for n, m in module.named_modules() if type(m) is torch.nn.Linear and ".lora_" not in n]
        assert _bnb_layers(module, precision) and not plain
    layer = parts.denoiser.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert layer.base_layer in _bnb_layers(parts.denoiser, precision)  # peft's QLoRA layer over bitsandbytes
    assert layer.lora_A["default"].weight.dtype == torch.float32 and layer.lora_A["default"].weight.requires_grad
    assert len(result.samples) == 1
    fresh = SD1Family().load(ModelSource(str(tiny_sd1[0])))  # the adapter file on the unquantized model
    settings = NetworkSettings(dim=4, alpha=2.0)
    adapted = [inject(fresh.denoiser if t.component == "denoiser" else fresh.text_encoders[t.component], t, settings)
               for t in SD1Family().adapter_targets(fresh)]
    assert files.load_into(adapted, result.adapter_path) == sum(len(c.layers) for c in result.adapted)
    trained, reloaded = _adapter_params(result.adapted), _adapter_params(adapted)
    assert trained.keys() == reloaded.keys() and all(torch.equal(trained[k], reloaded[k]) for k in trained)


@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_flux_qlora_losses(flux_config, precision):
    result = train_network(flux_config(model={"base_model_precision": precision}))
    _check_losses(result.losses, GOLDEN_FLUX, GOLDEN_FLUX_Q[precision], precision)
    quantized = {name: len(_bnb_layers(m, precision)) for name, m in
                 [("denoiser", result.parts.denoiser), *result.parts.text_encoders.items()]}
    assert all(quantized.values()) and set(quantized) == {"denoiser", "te1", "te3"}  # CLIP-L and T5 too


def test_peer_spellings_and_what_a_quantized_base_refuses(make_config):
    spelled = {"NF4-bnb": "nf4", "int8-quanto": "int8", "int8-torchao": "int8", "no_change": "no_change"}
    for given, read in spelled.items():
        assert make_config(model={"base_model_precision": given}).model.base_model_precision == read
    with pytest.raises(ConfigError, match="'model.base_model_precision' = 'int4-quanto' is not one of"):
        make_config(model={"base_model_precision": "int4-quanto"})
    nf4 = {"base_model_precision": "nf4"}
    with pytest.raises(ConfigError, match="base_model_precision.*and 'train.fp8_base'.*choose one"):
        make_config(model=nf4, train={"fp8_base": True, "mixed_precision": "bf16"})
    make_config(model=nf4, train={"blocks_to_swap": 2, "gradient_checkpointing": True})  # swapped with quant state
    lokr = {"network_module": "lycoris.kohya", "network_args": ["algo=lokr"]}
    with pytest.raises(ConfigError, match='algo = "lokr".*use lora or locon'):
        make_config(model=nf4, network=lokr)
    make_config(model={"base_model_precision": "int8"}, network=lokr)  # int8 keeps the weight's shape: LoKr runs
    with pytest.raises(ConfigError, match='algo = "dora"'):
        make_config(model={"base_model_precision": "int8"}, network={"dora_wd": True})


def test_full_fine_tune_with_a_quantized_base_is_refused_in_one_line(tiny_sd1, tiny_data, tmp_path, capsys):
    import toml

    import train_db

    config = {"model": {"pretrained_model_name_or_path": str(tiny_sd1[0]), "base_model_precision": "nf4"},
              "dataset": {"train_data_dir": str(tiny_data), "resolution": 64},
              "train": {"output_dir": str(tmp_path / "out"), "max_train_steps": 2}}
    path = tmp_path / "db.toml"
    path.write_text(toml.dumps(config))
    with pytest.raises(SystemExit) as stopped:
        train_db.main(["--config", str(path)])
    err = capsys.readouterr().err.strip()
    assert stopped.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "'model.base_model_precision' = \"nf4\"" in err and "train_db.py" in err
    assert not (tmp_path / "out").exists()  # refused before anything was written or loaded


def _quantized_tensors(module, precision):
    """Every tensor bitsandbytes keeps for the quantized layers of `module`: the weights and their quant state
    (int8: CB / SCB on the weight and the matmul state; nf4: the block absmax, its own absmax and the code
    tables)."""
    for layer in _bnb_layers(module, precision):
        if precision == "int8":
            candidates = [layer.weight, layer.weight.CB, layer.weight.SCB, layer.state.CB, layer.state.SCB]
        else:
            state = layer.weight.quant_state
            candidates = [layer.weight, state.absmax, state.code, state.offset, state.state2.absmax,
                          state.state2.code]
        yield from (t for t in candidates if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_quantized_state_goes_where_the_run_puts_it(flux_config, gpu, precision):
    """On the test device: the denoiser's quantized weights and every piece of their quant state train on the
    device; the text encoders', cached, go back to the host (bitsandbytes keeps quant state outside parameters
    and buffers, which module.to() alone does not move: issue 15's defect 7)."""
    import fake_device

    result = train_network(flux_config(model={"base_model_precision": precision}, network={"network_train_unet_only": True},
                               train={"cache_text_encoder_outputs": True, "max_train_steps": 2}))
    assert len(result.losses) == 2 and all(0 < x < 2 for x in result.losses)
    on_device = list(_quantized_tensors(result.parts.denoiser, precision))
    assert len(on_device) > 100 and all(fake_device.on_device(t) for t in on_device)
    for name, encoder in result.parts.text_encoders.items():
        tensors = list(_quantized_tensors(encoder, precision))
        assert tensors and not any(fake_device.on_device(t) for t in tensors), name
    quantized = sum(t.numel() * t.element_size() for t in on_device)
    assert fake_device.resident_bytes() >= quantized


@pytest.mark.parametrize("precision", ["int8", pytest.param("nf4", marks=pytest.mark.slow)])  # nf4: minutes here
def test_block_swap_moves_the_quantized_state_and_changes_no_loss(flux_config, gpu, precision):
    """base_model_precision with blocks_to_swap on the test device: the swapped blocks' bitsandbytes layers come to
    the device with their quant state for each forward and the forward backward re-runs, and go back to the host
    (pinned slabs there); the losses are the unswapped quantized run's. After the run the swapped blocks' weights
    and quant state are on the host, the other blocks' on the device."""
    import fake_device

    def run(**train):
        return train_network(flux_config(model={"base_model_precision": precision},
                                         network={"network_train_unet_only": True},
                                         train={"cache_text_encoder_outputs": True, "max_train_steps": 2,
                                                "gradient_checkpointing": True, **train},
                                         save={"overwrite": True}))

    plain, swapped = run(), run(blocks_to_swap=2)
    assert swapped.losses == pytest.approx(plain.losses, rel=1e-6, abs=1e-9)
    swapper = swapped.parts.denoiser._block_swapper
    assert len(swapper.swapped) == 3 and swapper.loads == 3 * 2 * 2  # 1 double + 2 single blocks, 2 steps
    assert swapper.most_resident <= 2
    blocks = [swapper.blocks[k] for k in swapper.swapped]
    away = [t for block in blocks for t in _quantized_tensors(block, precision)]
    assert len(away) > 10 and not any(fake_device.on_device(t) for t in away)
    ids = {id(t) for t in away}
    kept = [t for t in _quantized_tensors(swapped.parts.denoiser, precision) if id(t) not in ids]
    assert len(kept) > 10 and all(fake_device.on_device(t) for t in kept)


@pytest.mark.parametrize("shape", [(96, 200), (64, 64), (5, 3)])
@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_the_planners_stand_in_holds_bitsandbytes_bytes(shape, precision):
    """The planner's quantized layer (bitsandbytes cannot run on fake tensors) has the storages bitsandbytes
    makes for the same Linear, to the byte."""
    from library.planner.quantized import planned_linear, quantized_bytes
    from library.quantization import bnb_linear

    child = torch.nn.Linear(shape[1], shape[0])
    real = bnb_linear(torch.nn.Linear(shape[1], shape[0]), precision, torch.float32)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in _quantized_tensors(real, precision)}
    planned = planned_linear(child, precision, torch.float32)
    held = sum(t.numel() * t.element_size() for name, t in [*planned.named_parameters(), *planned.named_buffers()]
               if name != "bias")
    assert sum(storages.values()) == quantized_bytes(*shape, precision) == held


@pytest.fixture(scope="module")
def wide_flux(tiny_flux, tmp_path_factory):
    """The tiny FLUX.1 with its transformer widened to 256 (its Linear weights dominate), planned for a LoRA."""
    import json
    import shutil

    from library.config import NetworkSection
    from library.planner.step import StepSettings

    folder = tmp_path_factory.mktemp("arch") / "wide-flux"
    shutil.copytree(tiny_flux["folder"], folder)
    config_path = folder / "transformer" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "num_attention_heads": 16}))
    return StepSettings(recipe="network", family="flux", arch=str(folder), width=64, height=64, batch_size=1,
                        mixed_precision="bf16", gradient_checkpointing=True, cache_latents=True,
                        cache_text_encoder_outputs=True, train_text_encoder=False,
                        network=NetworkSection(network_dim=4, network_alpha=2.0))


@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_the_planner_counts_a_quantized_base(wide_flux, precision):
    """Planned weights on the device (the denoiser; text encoders and VAE cached away) go down by exactly what
    bitsandbytes saves on each Linear: 2 bytes a weight in bf16 -> its quantized bytes."""
    import dataclasses

    from diffusers import FluxTransformer2DModel

    from library.planner import plan, switch_text
    from library.planner.quantized import quantized_bytes

    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(wide_flux.arch,
                                                                                      subfolder="transformer"))
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    saved = sum(2 * m.weight.numel() - quantized_bytes(m.out_features, m.in_features, precision) for m in linears)
    base = plan(wide_flux)
    quantized_settings = dataclasses.replace(wide_flux, base_model_precision=precision)
    quantized = plan(quantized_settings)
    assert base.breakdown["weights"] - quantized.breakdown["weights"] == pytest.approx(saved, rel=1e-3)
    assert quantized.breakdown["adapter weights"] == base.breakdown["adapter weights"] > 0
    assert f"base_model_precision={precision}" in switch_text(quantized_settings)
    assert any("base_model_precision" in note for note in quantized.notes)


def test_flux_qlora_in_bf16_near_the_bf16_base(flux_config):
    """Under bf16 autocast with gradient checkpointing (how the large models train): nf4 computes in bf16, int8 in
    fp16; both stay within their tolerance of the bf16 run on the unquantized base (measured when written: int8
    3e-4, nf4 2.4e-2)."""
    bf16 = {"mixed_precision": "bf16", "gradient_checkpointing": True}
    plain = train_network(flux_config(train=bf16)).losses
    for precision in ("int8", "nf4"):
        losses = train_network(flux_config(model={"base_model_precision": precision}, train=bf16,
                                   save={"overwrite": True})).losses
        assert losses == pytest.approx(plain, rel=NEAR[precision]) and losses != pytest.approx(plain, rel=1e-6)


# ---- the text encoder stored smaller while it encodes (model.t5xxl_precision) ------------------------------

# Relative RMS error of the caption embeddings (over every position), each precision against the bf16 encoder,
# on the tiny random-weight models, measured when written: fp8 0.015-0.081, int8 0.005-0.016, nf4 0.085-0.38 (the
# tiny encoders are 2-4 layers 32-48 wide with random weights: NF4's 16 levels per 64-weight block cost more
# there than on a trained model's near-normal weights). The bound is 1.25x the largest measured, per precision.
TEXT_NEAR = {"fp8": 0.1, "int8": 0.02, "nf4": 0.48}
TEXT_FAMILIES = [("zimage", "tiny_zimage", "Qwen3Model"), ("qwen_image", "tiny_qwen", "Qwen2_5_VLTextModel"),
                 ("flux2", "tiny_flux2", "Qwen3ForCausalLM"), ("flux2", "tiny_flux2_dev",
                                                               "Mistral3ForConditionalGeneration"),
                 ("chroma", "tiny_chroma", "T5EncoderModel")]


def _text_parts(family_name, folder):
    from library.families import ModelSource, get_family

    family = get_family(family_name, str(folder))
    parts = family.load(ModelSource(str(folder), t5xxl_max_token_length=16))
    for module in [parts.denoiser, parts.vae, *parts.text_encoders.values()]:
        module.requires_grad_(False)
    for encoder in parts.text_encoders.values():
        encoder.to(torch.bfloat16)
    return family, parts


@pytest.mark.parametrize("family_name, tiny, encoder_class", TEXT_FAMILIES)
def test_text_encoder_stored_smaller_encodes_near_bf16(family_name, tiny, encoder_class, request):
    """fp8 / int8 / nf4 storage of FLUX.2's, Qwen-Image's, Z-Image's and Chroma's text encoder: its embeddings
    within TEXT_NEAR of the bf16 encoder's, nf4 the farthest and the smallest (its Linears bitsandbytes Linear4bit,
    T5's `wo` and a language model's lm_head kept, as transformers' 4-bit loading keeps them)."""
    import copy

    import bitsandbytes as bnb

    from library.quantization import store_t5, weight_bytes

    family, parts = _text_parts(family_name, request.getfixturevalue(tiny)["folder"])
    captions = ["a photo of a red circle", "blue", "a large green square on a white table, seen from above"]
    with torch.no_grad():
        reference = family.encode_prompts(parts, captions, 1)["prompt_embeds"].float()
    errors, sizes = {}, {}
    for precision in ("fp8", "int8", "nf4"):
        small = copy.deepcopy(parts)
        assert store_t5(small, precision, torch.bfloat16) == list(parts.text_encoders)
        encoder = next(iter(small.text_encoders.values())).to("cpu")  # bitsandbytes quantizes when it moves
        assert type(encoder).__name__ == encoder_class
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            out = family.encode_prompts(small, captions, 1)["prompt_embeds"].float()
        errors[precision] = ((out - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt()).item()
        sizes[precision] = weight_bytes(encoder)
    assert all(0 < errors[p] < TEXT_NEAR[p] for p in errors), errors
    assert errors["int8"] < errors["fp8"] < errors["nf4"] and sizes["nf4"] < min(sizes["fp8"], sizes["int8"])
    kept = {n.rsplit(".", 1)[-1] for n, m in encoder.named_modules() if type(m) is torch.nn.Linear}
    assert kept <= {"lm_head", "wo"} and any(isinstance(m, bnb.nn.Linear4bit) for m in encoder.modules())


@pytest.mark.parametrize("family_name, tiny, model_class", [("zimage", "tiny_zimage", "Qwen3Model"),
                                                             ("chroma", "tiny_chroma", "T5EncoderModel")])
def test_nf4_text_encoder_is_transformers_4bit_loading(family_name, tiny, model_class, request):
    """t5xxl_precision = "nf4" holds the bytes and computes the outputs of the same encoder loaded by transformers
    with BitsAndBytesConfig(load_in_4bit=True, nf4, double quantization): bitsandbytes' own NF4, the same layers
    quantized (T5's wo kept)."""
    import transformers
    from transformers import BitsAndBytesConfig

    from library.families import ModelSource, get_family
    from library.quantization import store_t5

    folder = request.getfixturevalue(tiny)["folder"]
    parts = get_family(family_name, str(folder)).load(ModelSource(str(folder), t5xxl_max_token_length=16))
    encoder = next(iter(parts.text_encoders.values())).requires_grad_(False)
    store_t5(parts, "nf4", torch.bfloat16)
    encoder.to("cpu")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    theirs = getattr(transformers, model_class).from_pretrained(str(folder), subfolder="text_encoder",
                                                                 quantization_config=config, device_map="cpu")
    for layer in theirs.modules():  # as ours (library.quantization.nf4_linear): no CPU repacking
        if hasattr(layer, "support_avx512bf16_for_cpu"):
            layer.support_avx512bf16_for_cpu = False
    ours_state, their_state = encoder.state_dict(), theirs.state_dict()
    assert ours_state.keys() == their_state.keys()
    assert all(torch.equal(ours_state[k].float(), their_state[k].float()) for k in ours_state)
    ids = torch.randint(0, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(encoder(ids).last_hidden_state, theirs(ids).last_hidden_state)


@pytest.mark.parametrize("family_config, golden, pinned", [
    ("zimage_config", GOLDEN_ZIMAGE, [1.461507, 1.596335, 1.459211, 1.524519]),
    ("qwen_config", GOLDEN_QWEN, [1.457861, 1.516845, 1.460297, 1.454128])])
def test_cached_text_runs_train_with_an_nf4_text_encoder(family_config, golden, pinned, request):
    """Z-Image's Qwen3 and Qwen-Image's Qwen2.5-VL in nf4 while the captions are cached: the encoder visits the
    device, stays on the host in 4 bits, and the run's losses come within 5e-3 of the unquantized encoder's goldens
    (goldens.GOLDEN_ZIMAGE / GOLDEN_QWEN; measured 2.4e-3 / 2.3e-4 when written) and
    differ from them; pinned to 2e-3 (bitsandbytes' CPU kernels) as the quantized-base runs are."""
    import bitsandbytes as bnb

    result = train_network(request.getfixturevalue(family_config)(
        model={"t5xxl_precision": "nf4-bnb"}, train={"cache_text_encoder_outputs": True}))
    encoder = result.parts.text_encoders["te"]
    assert encoder.device.type == "cpu" and any(isinstance(m, bnb.nn.Linear4bit) for m in encoder.modules())
    assert result.losses == pytest.approx(golden, rel=5e-3) and result.losses != pytest.approx(golden, rel=1e-6)
    assert result.losses == pytest.approx(pinned, rel=2e-3)


@pytest.fixture(scope="module")
def wide_text_zimage(tiny_zimage, tmp_path_factory):
    """The tiny Z-Image with its Qwen3 widened (64 heads of 64, a 16384-wide MLP: its Linear weights dominate the
    caption-encoding phase), planned for a LoRA with cached captions."""
    import json
    import shutil

    from library.config import NetworkSection
    from library.planner.step import StepSettings

    folder = tmp_path_factory.mktemp("arch") / "wide-text-zimage"
    shutil.copytree(tiny_zimage["folder"], folder)
    config_path = folder / "text_encoder" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "intermediate_size": 16384,
                                       "num_attention_heads": 64, "num_key_value_heads": 16, "head_dim": 64}))
    return StepSettings(recipe="network", family="zimage", arch=str(folder), width=64, height=64,
                        mixed_precision="bf16", cache_latents=True, cache_text_encoder_outputs=True,
                        train_text_encoder=False, network=NetworkSection(network_dim=4, network_alpha=2.0))


@pytest.mark.slow
def test_the_planners_caption_phase_counts_a_quantized_text_encoder(wide_text_zimage):
    """t5xxl_precision = nf4 / int8: the planned caption-encoding phase holds bitsandbytes' bytes for each of
    Qwen3's Linears instead of 2 bytes a weight (library/planner/quantized.py): nf4 lowers it by exactly that;
    int8 by that less LLM.int8's transient fp16 copies (under three of the largest layer's 16-bit
    weights and the input cast to fp16; measured 3.10 of 5.23 MB saved)."""
    import dataclasses

    from transformers import Qwen3Config, Qwen3Model

    from library.planner import plan
    from library.planner.quantized import quantized_bytes

    with torch.device("meta"):
        encoder = Qwen3Model(Qwen3Config.from_pretrained(wide_text_zimage.arch, subfolder="text_encoder"))
    shapes = [(m.out_features, m.in_features) for m in encoder.modules() if type(m) is torch.nn.Linear]
    largest = max(2 * o * i for o, i in shapes)
    text = {p: plan(dataclasses.replace(wide_text_zimage, t5xxl_precision=p)) for p in ("auto", "int8", "nf4")}
    for precision in ("int8", "nf4"):
        saved = sum(2 * o * i - quantized_bytes(o, i, precision) for o, i in shapes)
        lowered = text["auto"].phases["text"].allocated - text[precision].phases["text"].allocated
        assert any(f"t5xxl_precision {precision}" in note for note in text[precision].notes)
        if precision == "nf4":
            assert lowered == pytest.approx(saved, rel=5e-3)
        else:
            assert saved - 3 * largest <= lowered <= saved


@pytest.mark.parametrize("family, arch", [("qwen_image", "qwen-image"), ("zimage", "zimage")])
def test_budget_search_offers_the_text_encoder_in_fp8_then_nf4(family, arch):
    """--vram_budget's ladder: the large text encoder in fp8, then in nf4 (search_budget takes nf4 only while the
    caption-encoding phase is over the budget, else after every other switch)."""
    from library.planner.budget import TEXT_NF4, _ladder
    from library.planner.step import StepSettings

    steps = {name: change for name, change, _, _ in _ladder(StepSettings(recipe="network", family=family, arch=arch,
                                                                         width=64, height=64))}
    names = list(steps)
    assert names.index(TEXT_NF4) == names.index("T5-XXL in fp8 while encoding") + 1
    assert steps[TEXT_NF4] == {"t5xxl_precision": "nf4"}
