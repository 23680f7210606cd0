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
    from library.config import ConfigError

    with pytest.raises(ConfigError, match=r"'save.resume' = 'latest': .*lora-state was saved with another config; "
                                          r"what differs:\n  optimizer.learning_rate: saved 0.0001, now 0.001"):
        _db(make_config, tmp_path, optimizer={"learning_rate": 1e-3}, save={"resume": "latest"})  # before loading


def test_nan_steps_are_skipped_then_the_run_stops(make_config, tmp_path, monkeypatch):
    from library.guards import NonFiniteLoss

    import library.training

    real = library.training.batch_loss  # train() imports it when it starts: patched here, it is the one used
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] in (2, 4, 5, 6) else loss

    monkeypatch.setattr(library.training, "batch_loss", sometimes_nan)
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
    from library.config import ConfigError

    with pytest.raises(ConfigError, match=r"cannot write .*lora: No space left on device \(this save needs about "
                                          r"[\d,.]+ MB, [\d,]+ MB free\). Earlier files are intact"):
        train_db.train(_db(make_config, tmp_path))
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir() if p.name not in ("logs", ".latent-trainer.lock")) == [
        "lora-config.toml", "lora-step00000003-state", "lora-step00000003.safetensors"]
    assert load_file(out / "lora-step00000003.safetensors")  # intact and readable


def _db_toml(tmp_path, tiny_sd1, tiny_data, steps, **save):
    import toml

    out = tmp_path / "out"
    config = {"model": {"pretrained_model_name_or_path": str(tiny_sd1[0])},
              "dataset": {"train_data_dir": str(tiny_data), "resolution": 64, "train_batch_size": 2},
              "optimizer": {"learning_rate": 1e-4},
              "train": {"output_dir": str(out), "output_name": "db", "max_train_steps": steps, "seed": 3},
              "dreambooth": {"train_text_encoder": False},
              "save": {"save_state": True, **save}, "logging": {"log_every_n_steps": 1}}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "db.toml"
    path.write_text(toml.dumps(config))
    return path, out


def _launch(script, *args, env=None):
    import subprocess
    import sys

    from conftest import ROOT

    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


RUN = "import sys, train_db; sys.exit(train_db.main(sys.argv[1:]))"


def _wait_for(proc, text):
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError("never saw " + repr(text) + ":\n" + "".join(lines[-30:]))


@pytest.mark.slow
def test_sigterm_saves_a_state_and_the_resumed_run_ends_identical(tmp_path, tiny_sd1, tiny_data):
    import signal

    config, out = _db_toml(tmp_path, tiny_sd1, tiny_data, 12)
    proc = _launch(RUN, "--config", config)
    _wait_for(proc, "step 3/12")
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=300)[0]
    assert proc.returncode == 75, rest
    states = sorted(out.glob("db-step*-state"))
    assert len(states) == 1 and "saved resumable state" in rest
    resumed = _launch(RUN, "--config", config, "--set", "save.resume=latest")
    text = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, text
    whole_config, whole_out = _db_toml(tmp_path / "whole", tiny_sd1, tiny_data, 12)
    whole = _launch(RUN, "--config", whole_config)
    assert whole.communicate(timeout=300)[0] and whole.returncode == 0
    a, b = load_file(out / "db.safetensors"), load_file(whole_out / "db.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


SLOW_SAVE = """
import sys, time, library.checkpoint as c
real = c.save_file
def slow(tensors, path, metadata=None):
    print("WRITING", path, flush=True)
    with open(path, "wb") as f:
        f.write(b"half a file")
    time.sleep(0.3)
    real(tensors, path, metadata=metadata)
c.save_file = slow
import train_db
sys.exit(train_db.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_9_during_a_save_leaves_only_good_files_and_resumes(tmp_path, tiny_sd1, tiny_data):
    import random
    import time

    from library.checkpoint import check_resumable
    from library.config_files import load_config

    config, out = _db_toml(tmp_path, tiny_sd1, tiny_data, 8, save_every_n_steps=1)
    proc = _launch(SLOW_SAVE, "--config", config)
    for _ in range(3):  # let a few saves complete, then kill inside a later one
        _wait_for(proc, "WRITING")
    time.sleep(random.uniform(0.0, 0.25))
    proc.kill()
    proc.wait()
    finished = [p for p in out.iterdir() if not p.name.endswith((".tmp", ".old", ".lock")) and p.name != "logs"]
    for path in finished:
        if path.suffix == ".safetensors":
            assert load_file(path)  # every file under its real name is complete
        elif path.name.endswith("-state"):
            check_resumable(path, load_config(config, check_paths=False).to_toml_dict())  # readable, same config
    resumed = _launch(RUN, "--config", config, "--set", "save.resume=latest")
    text = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, text
    assert "resumed from" in text and (out / "db.safetensors").is_file()


def test_resumed_lora_run_mid_epoch_equals_the_uninterrupted_one(make_config, tmp_path):
    import train_network

    def lora(**sections):
        base = {"train": {"max_train_steps": 7}, "dataset": {"flip_aug": True},
                "save": {"save_every_n_steps": 3, "save_state": True}}  # 4 steps per epoch: step 3 is mid-epoch
        for name, values in sections.items():
            base.setdefault(name, {}).update(values)
        return make_config(**base)

    whole = train_network.train(lora(train={"output_name": "whole"}))
    state = tmp_path / "out" / "whole-step00000003-state"
    resumed = train_network.train(lora(train={"output_name": "resumed"}, save={"resume": str(state)}))
    assert resumed.losses == whole.losses[3:]
    a, b = load_file(whole.adapter_path), load_file(resumed.adapter_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_save_last_n_steps_keeps_the_newest(make_config, tmp_path):
    import train_network

    train_network.train(make_config(train={"max_train_steps": 7},
                                    save={"save_every_n_steps": 1, "save_state": True, "save_last_n_steps": 2}))
    names = sorted(p.name for p in (tmp_path / "out").iterdir()
                   if p.name not in ("logs", "lora-config.toml", ".latent-trainer.lock"))
    assert names == ["lora-state", "lora-step00000005-state", "lora-step00000005.safetensors",
                     "lora-step00000006-state", "lora-step00000006.safetensors", "lora.safetensors"]
