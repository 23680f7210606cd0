"""A quantized frozen base (model.base_model_precision = int8 / nf4, QLoRA through bitsandbytes): seeded tiny
LoRA runs of SD1 and FLUX.1 within a stated tolerance of the unquantized base's golden losses, the adapters in
full precision over bitsandbytes layers, the saved adapter reloading to the trained weights, the quantized state
placed where the run puts it on the test device, and the refusals."""
import pytest
import torch
from test_flux import GOLDEN_FLUX, flux_config, tiny_flux  # noqa: F401  (fixtures)
from test_train_sd1 import GOLDEN

from library.config import ConfigError


def _lora(cfg):
    from train_network import train

    return train(cfg)


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
GOLDEN_SD1 = {"int8": [1.021592, 1.195188, 1.198294, 1.111079], "nf4": [1.020074, 1.187161, 1.202112, 1.112238]}
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
    result = _lora(make_config(model={"base_model_precision": precision},
                               sample={"sample_prompts": str(prompts)}))
    _check_losses(result.losses, GOLDEN, GOLDEN_SD1[precision], precision)
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
def test_flux_qlora_losses(flux_config, precision):  # noqa: F811
    result = _lora(flux_config(model={"base_model_precision": precision}))
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
    with pytest.raises(ConfigError, match="base_model_precision.*'train.blocks_to_swap'"):
        make_config(model=nf4, train={"blocks_to_swap": 2, "gradient_checkpointing": True})
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
