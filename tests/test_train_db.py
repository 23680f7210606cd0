"""DreamBooth / full fine-tune on the tiny SD1 model: golden losses with prior preservation, class images
generated once, the exported single file and diffusers folder, fused backward, EMA, text-encoder stop."""
import pytest
import torch

from library.families.base import ModelSource
from library.families.sd1 import SD1Family
from train_db import train

# seed 7, 8 images + 2 generated class images balanced to 8 regularization examples (prior_loss_weight 0.5),
# batch 2, AdamW lr 1e-4, U-Net + text encoder, 5 steps
GOLDEN_DB = [0.5099448, 0.8822036, 0.5995577, 0.7960287, 1.1267693]


@pytest.fixture
def db_config(make_config, tmp_path):
    def make(**sections):
        base = {"dreambooth": {"class_data_dir": str(tmp_path / "class"), "class_prompt": "a photo of a shape",
                               "num_class_images": 2},
                "dataset": {"prior_loss_weight": 0.5},
                "optimizer": {"learning_rate": 1e-4, "max_grad_norm": 0.0}, "sample": {"sample_steps": 2},
                "train": {"max_train_steps": 5}}
        for name, values in sections.items():
            base.setdefault(name, {}).update(values)
        return make_config(**base)
    return make


def _weights(parts):
    return {**{f"unet.{k}": v for k, v in parts.denoiser.state_dict().items()},
            **{f"te.{k}": v for k, v in parts.text_encoders["te"].state_dict().items()}}


def test_golden_losses_with_prior_preservation_and_class_images_made_once(db_config, tmp_path):
    result = train(db_config())
    assert result.losses == pytest.approx(GOLDEN_DB, rel=1e-5)
    made = sorted(p.name for p in (tmp_path / "class").iterdir())
    assert made == ["class_00000.png", "class_00000.txt", "class_00001.png", "class_00001.txt"]
    assert (tmp_path / "class" / "class_00001.txt").read_text() == "a photo of a shape"
    stamp = (tmp_path / "class" / "class_00000.png").stat().st_mtime_ns
    again = train(db_config(train={"output_name": "again"}))
    assert (tmp_path / "class" / "class_00000.png").stat().st_mtime_ns == stamp  # reused, not regenerated
    assert again.losses == pytest.approx(GOLDEN_DB, rel=1e-5)
    heavier = train(db_config(train={"output_name": "heavier"}, dataset={"prior_loss_weight": 1.0}))
    assert heavier.losses != pytest.approx(GOLDEN_DB, rel=1e-5)


def test_single_file_reloads_to_identical_weights(db_config, tiny_sd1):
    result = train(db_config())
    folder = tiny_sd1[0]
    reloaded = SD1Family().load(ModelSource(str(result.model_path), arch=str(folder),
                                            tokenizer=str(folder / "tokenizer")))
    trained, loaded = _weights(result.parts), _weights(reloaded)
    assert trained.keys() == loaded.keys()
    assert all(torch.equal(trained[k], loaded[k]) for k in trained)
    base = _weights(SD1Family().load(ModelSource(str(folder))))
    assert any(not torch.equal(trained[k], base[k]) for k in trained if k.startswith("te."))  # the TE trained


def test_diffusers_folder_loads_with_from_pretrained(db_config):
    from diffusers import StableDiffusionPipeline

    result = train(db_config(save={"save_model_as": "diffusers"}, dreambooth={"train_text_encoder": False}))
    assert result.model_path.is_dir() and (result.model_path / "model_index.json").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(str(result.model_path))
    state = pipe.unet.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in result.parts.denoiser.state_dict().items())


def test_fused_backward_pass_gives_the_same_training(db_config):
    plain = train(db_config(optimizer={"optimizer_type": "Adafactor"}))
    fused = train(db_config(optimizer={"optimizer_type": "Adafactor", "fused_backward_pass": True},
                            train={"output_name": "fused"}))
    groups = train(db_config(optimizer={"optimizer_type": "Adafactor", "fused_optimizer_groups": 3},
                             train={"output_name": "groups"}))
    assert fused.losses == pytest.approx(plain.losses, abs=1e-5)
    assert groups.losses == pytest.approx(plain.losses, abs=1e-5)
    a, b = _weights(plain.parts), _weights(fused.parts)
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-5


def test_text_encoder_stops_and_ema_is_saved(db_config, tiny_sd1):
    from safetensors.torch import load_file

    base_te = SD1Family().load(ModelSource(str(tiny_sd1[0]))).text_encoders["te"].state_dict()
    stopped = train(db_config(dreambooth={"stop_text_encoder_training": 1, "use_ema": True, "ema_decay": 0.5},
                              optimizer={"learning_rate": 1e-3}))
    one_step = train(db_config(train={"max_train_steps": 1, "output_name": "one"},
                               optimizer={"learning_rate": 1e-3}))
    te_after, te_one = stopped.parts.text_encoders["te"].state_dict(), one_step.parts.text_encoders["te"].state_dict()
    assert all(torch.equal(te_after[k], te_one[k]) for k in te_after)  # frozen after step 1
    assert any(not torch.equal(te_after[k], base_te[k]) for k in te_after)
    paths = [p.name for p in stopped.saved]
    assert paths == ["lora.safetensors", "lora-ema.safetensors"]
    model, ema = load_file(stopped.saved[0]), load_file(stopped.saved[1])
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert not torch.equal(model[key], ema[key])


def test_loss_options_change_the_losses(db_config):
    options = {"min_snr_gamma": 5.0, "noise_offset": 0.05, "loss_type": "huber", "ip_noise_gamma": 0.1}
    losses = train(db_config(loss=options)).losses
    assert len(losses) == 5 and losses != pytest.approx(GOLDEN_DB, rel=1e-3) and all(0 < x < 2 for x in losses)
