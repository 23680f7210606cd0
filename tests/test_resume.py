"""Never lose a run: exact resume, signals, NaN guard, disk full."""
import pytest
import torch
from safetensors.torch import load_file

import train_db


def _db(make_config, tmp_path, **sections):
    base = {"optimizer": {"learning_rate": 1e-4, "max_grad_norm": 1.0}, "train": {"max_train_steps": 6},
            "dreambooth": {"train_text_encoder": False}, "save": {"save_every_n_steps": 3, "save_state": True}}
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return make_config(**base)


def test_resumed_db_run_equals_the_uninterrupted_one(make_config, tmp_path):
    whole = train_db.train(_db(make_config, tmp_path, train={"output_name": "whole"}))
    assert (tmp_path / "out" / "whole-step00000003-state" / "state.json").is_file()
    first = train_db.train(_db(make_config, tmp_path, train={"output_name": "part", "max_train_steps": 3},
                               save={"save_every_n_steps": None}))
    assert first.losses == whole.losses[:3]
    state = tmp_path / "out" / "whole-step00000003-state"
    resumed = train_db.train(_db(make_config, tmp_path, train={"output_name": "resumed"},
                                 save={"resume": str(state)}))
    assert resumed.losses == whole.losses[3:]  # bitwise: same data order, noise, optimizer and RNG state
    a, b = load_file(whole.model_path), load_file(resumed.model_path)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_a_different_config_names_what_differs(make_config, tmp_path):
    train_db.train(_db(make_config, tmp_path, train={"max_train_steps": 3}))
    with pytest.raises(ValueError, match=r"optimizer.learning_rate: saved 0.0001, now 0.001"):
        train_db.train(_db(make_config, tmp_path, optimizer={"learning_rate": 1e-3}, save={"resume": "latest"}))


def test_nan_steps_are_skipped_then_the_run_stops(make_config, tmp_path, monkeypatch):
    from library.guards import NonFiniteLoss

    real = train_db.batch_loss
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] in (2, 4, 5, 6) else loss

    monkeypatch.setattr(train_db, "batch_loss", sometimes_nan)
    with pytest.raises(NonFiniteLoss, match="3 steps in a row.*no_half_vae.*learning rate"):
        train_db.train(_db(make_config, tmp_path, train={"nan_skip_limit": 3, "max_train_steps": 10},
                           save={"save_every_n_steps": None, "save_state": False}))
    calls["n"] = 0
    result = train_db.train(_db(make_config, tmp_path, train={"nan_skip_limit": 4, "output_name": "ok"},
                                save={"save_every_n_steps": None, "save_state": False}))
    assert [x != x for x in result.losses] == [False, True, False, True, True, True]  # skipped, not trained on
    weights = result.parts.denoiser.state_dict()
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_disk_full_at_save_is_a_clear_error_and_earlier_files_survive(make_config, tmp_path, monkeypatch):
    import library.checkpoint as checkpoint

    real, calls = checkpoint.save_file, {"n": 0}

    def full_disk(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 3:  # weights at step 3 went fine, its state too; the final save fails half-way
            open(path, "wb").write(b"partial")
            raise OSError(28, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(OSError, match=r"cannot write .*lora: No space left on device. Earlier files are untouched"):
        train_db.train(_db(make_config, tmp_path))
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir() if p.name != "logs") == [
        "lora-config.toml", "lora-step00000003-state", "lora-step00000003.safetensors"]
    assert load_file(out / "lora-step00000003.safetensors")  # intact and readable
