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
