"""A user's mistake is one line and an exit code, never a traceback, and nothing the user had changes.

Each case writes a config (and whatever files the fault needs) into a fresh folder, runs the recipe's main()
as the command line does, and asserts: the exit code (2 config, 3 data), the first line of stderr (it names
the file and the key), no traceback, and every file that was in the folder before is byte-identical after.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import toml

import train_db
import train_network
from conftest import ROOT

RECIPES = {"network": train_network, "db": train_db}


def _config(tiny_sd1, tiny_data, folder: Path, **sections) -> dict:
    config = {"model": {"pretrained_model_name_or_path": str(tiny_sd1[0])},
              "network": {"network_dim": 4, "network_alpha": 2.0},
              "dataset": {"train_data_dir": str(tiny_data), "resolution": 64, "train_batch_size": 2},
              "optimizer": {"learning_rate": 1e-3},
              "train": {"output_dir": str(folder / "out"), "output_name": "lora", "max_train_steps": 2, "seed": 7}}
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return config


def _write(folder: Path, config: dict, name: str = "run.toml") -> Path:
    path = folder / name
    path.write_text(toml.dumps(config), encoding="utf-8")
    return path


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _run(capsys, recipe: str, *argv) -> tuple[int, str]:
    with pytest.raises(SystemExit) as stopped:
        RECIPES[recipe].main([str(a) for a in argv])
    return stopped.value.code, capsys.readouterr().err


def _assert_one_line(code: int, err: str, want_code: int, *fragments: str, alone: bool = True) -> None:
    """The exit code, and stderr ending in one message: a line that says what and where (the details of a
    message with several problems indented below it); alone: nothing before it on stderr."""
    assert code == want_code, err
    assert "Traceback" not in err, err
    lines = [line for line in err.rstrip().splitlines() if not line.startswith("Loading weights")]
    starts = [i for i, line in enumerate(lines) if line.startswith(("config error: ", "dataset error: ",
                                                                     "training stopped: "))]
    assert len(starts) == 1 and (starts[0] == 0 or not alone), err
    assert all(line.startswith("  ") for line in lines[starts[0] + 1:]), err
    message = "\n".join(lines[starts[0]:])
    for fragment in fragments:
        assert fragment in message, (fragment, err)


CONFIG_FAULTS = {
    # name: (sections to change, fragments of the message)
    "negative learning rate": ({"optimizer": {"learning_rate": -1e-4}},
                               ["'optimizer.learning_rate' must be a finite number, 0 or more, got -0.0001"]),
    "NaN learning rate": ({"optimizer": {"learning_rate": float("nan")}},
                          ["'optimizer.learning_rate' must be a finite number, 0 or more, got nan"]),
    "NaN unet_lr": ({"network": {"unet_lr": float("inf")}}, ["'network.unet_lr'"]),
    "seed too large": ({"train": {"seed": 2**40}}, ["'train.seed' must be from 0 to 4294967295"]),
    "negative seed": ({"train": {"seed": -3}}, ["'train.seed'"]),
    "optimizer argument of the wrong type": ({"optimizer": {"optimizer_args": ['weight_decay="heavy"']}},
                                             ["'optimizer.optimizer_args': AdamW does not accept"]),
    "unknown optimizer argument": ({"optimizer": {"optimizer_args": ["momentumm=0.9"]}},
                                   ["'optimizer.optimizer_args'", "momentumm"]),
    "zero epochs": ({"train": {"max_train_epochs": 0}}, ["'train.max_train_epochs' must be at least 1"]),
    "negative alpha": ({"network": {"network_alpha": -4.0}}, ["'network.network_alpha' must be 0 or more"]),
    "warmup as long as the run": ({"optimizer": {"lr_warmup_steps": 2, "lr_scheduler": "constant_with_warmup"}},
                                  ["'optimizer.lr_warmup_steps' = 2 is as long as the whole run (2 steps)"]),
    "warmup as long as the epochs": ({"optimizer": {"lr_warmup_steps": 40}, "train": {"max_train_epochs": 2}},
                                     ["'optimizer.lr_warmup_steps' = 40 is as long as the whole run (8 steps)"]),
}


@pytest.mark.parametrize("recipe", ["network", "db"])
@pytest.mark.parametrize("fault", sorted(CONFIG_FAULTS))
def test_config_values_are_one_line_before_loading(fault, recipe, tiny_sd1, tiny_data, tmp_path, capsys):
    sections, fragments = CONFIG_FAULTS[fault]
    path = _write(tmp_path, _config(tiny_sd1, tiny_data, tmp_path, **sections))
    before = _snapshot(tmp_path)
    started = time.monotonic()
    code, err = _run(capsys, recipe, "--config", path)
    _assert_one_line(code, err, 2, str(path), *fragments)
    assert _snapshot(tmp_path) == before
    assert not (tmp_path / "out").exists()  # nothing was started
    assert time.monotonic() - started < 60  # (a generous bound: no model was loaded)


def test_config_file_with_a_bom_or_in_utf16_reads(tiny_sd1, tiny_data, tmp_path):
    from library.config_files import load_config

    text = toml.dumps(_config(tiny_sd1, tiny_data, tmp_path, train={"output_name": "café"}))
    for encoding, data in [("bom", b"\xef\xbb\xbf" + text.encode()), ("utf16", text.encode("utf-16"))]:
        path = tmp_path / f"{encoding}.toml"
        path.write_bytes(data)
        assert load_config(path).train.output_name == "café"


def test_config_file_in_another_encoding_is_named(tiny_sd1, tiny_data, tmp_path, capsys):
    text = toml.dumps(_config(tiny_sd1, tiny_data, tmp_path, train={"output_name": "café"}))
    path = tmp_path / "latin1.toml"
    path.write_bytes(text.encode("latin-1"))
    code, err = _run(capsys, "network", "--config", path)
    _assert_one_line(code, err, 2, f"{path}: not UTF-8 text (byte 0xe9", "save the file as UTF-8")


PROMPT_FILES = {
    "prompts.json": ('{"prompt": "a dog"}', "expected a list of prompts (strings or objects), got a dict"),
    "numbers.json": ("[1, 2]", "entry 1: expected a prompt string or an object, got 1"),
    "flat.toml": ('prompt = "a dog"', "expected a [prompt] table with [[prompt.subset]] entries"),
    "typed.toml": ('[prompt]\nwidth = 512\n[[prompt.subset]]\nprompt = 5', "subset 1: prompt must be a string"),
    "broken.json": ('["a dog",', "not valid JSON"),
}


@pytest.mark.parametrize("name", sorted(PROMPT_FILES))
def test_prompt_files_of_the_wrong_shape(name, tiny_sd1, tiny_data, tmp_path, capsys):
    text, fragment = PROMPT_FILES[name]
    prompts = tmp_path / name
    prompts.write_text(text, encoding="utf-8")
    path = _write(tmp_path, _config(tiny_sd1, tiny_data, tmp_path, sample={"sample_prompts": str(prompts)}))
    before = _snapshot(tmp_path)
    code, err = _run(capsys, "network", "--config", path)
    _assert_one_line(code, err, 2, "'sample.sample_prompts'", str(prompts), fragment)
    assert _snapshot(tmp_path) == before


def test_output_dir_that_is_a_file_or_read_only(tiny_sd1, tiny_data, tmp_path, capsys):
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    for out, fragment in [(taken, f"{taken} is a file, not a folder"),
                          (taken / "out", f"{taken / 'out'} cannot be made: {taken} is a file"),
                          (Path("/proc/1/out"), "is under /proc/1, which is read-only for this user")]:
        config = _config(tiny_sd1, tiny_data, tmp_path, train={"output_dir": str(out)})
        path = _write(tmp_path, config)
        before = _snapshot(tmp_path)
        code, err = _run(capsys, "network", "--config", path)
        _assert_one_line(code, err, 2, "'train.output_dir'", fragment)
        assert _snapshot(tmp_path) == before


# ---- files of earlier runs -----------------------------------------------------------------------


def test_an_earlier_runs_files_and_resolved_config_are_never_replaced(tiny_sd1, tiny_data, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "lora-v2.safetensors").write_bytes(b"another adapter the user keeps")  # not this run's: no conflict
    (out / "lora-config.toml").write_text("# the config of an earlier run\n")
    path = _write(tmp_path, _config(tiny_sd1, tiny_data, tmp_path))
    before = _snapshot(tmp_path)
    code, err = _run(capsys, "network", "--config", path)
    _assert_one_line(code, err, 2, f"{out / 'lora-config.toml'} exists from an earlier run")
    assert _snapshot(tmp_path) == before
    (out / "lora-config.toml").unlink()
    assert train_network.main(["--config", str(path)]) == 0  # name-v2 never blocked the run
    assert (out / "lora-v2.safetensors").read_bytes() == b"another adapter the user keeps"


def test_saved_files_get_the_permissions_of_the_users_umask(tiny_sd1, tiny_data, tmp_path):
    path = _write(tmp_path, _config(tiny_sd1, tiny_data, tmp_path, save={"save_state": True}))
    old = os.umask(0o022)
    try:
        assert train_network.main(["--config", str(path)]) == 0
    finally:
        os.umask(old)
    out = tmp_path / "out"
    for saved in [out / "lora.safetensors", out / "lora-state" / "trained.safetensors"]:
        assert stat.S_IMODE(saved.stat().st_mode) == 0o644, saved
    assert stat.S_IMODE((out / "lora-state").stat().st_mode) == 0o755


HOLD_LOCK = """
import sys, time
from pathlib import Path
from library.outputs import OutputLock
lock = OutputLock(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_run_into_the_same_output_dir_is_refused_until_the_first_ends(tiny_sd1, tiny_data, tmp_path,
                                                                                capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        path = _write(tmp_path, _config(tiny_sd1, tiny_data, tmp_path))
        code, err = _run(capsys, "network", "--config", path)
        _assert_one_line(code, err, 2, "'train.output_dir': another run (pid", f"is writing to {out}")
        assert not (out / "lora-config.toml").exists()
    finally:
        holder.kill()  # a killed run leaves no blocker behind
        holder.wait()
    assert train_network.main(["--config", str(path)]) == 0


# ---- resuming ------------------------------------------------------------------------------------


@pytest.fixture
def saved_run(tiny_sd1, tiny_data, tmp_path):
    """A LoRA run of 4 steps on a copy of the data, saving a state every 2 steps and at the end:
    (config path, out folder)."""
    shutil.copytree(tiny_data, tmp_path / "data")
    config = _config(tiny_sd1, tmp_path / "data", tmp_path, train={"max_train_steps": 4},
                     save={"save_every_n_steps": 2, "save_state": True})
    path = _write(tmp_path, config)
    assert train_network.main(["--config", str(path)]) == 0
    return path, tmp_path / "out"


def _resume(capsys, path, *extra, recipe="network"):
    return _run(capsys, recipe, "--config", path, "--set", "save.resume=\"latest\"", *extra)


def _damage(out: Path, name: str) -> None:
    victim = out / name
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])


RESUME_FAULTS = {
    "truncated state.json": (lambda out: _damage(out, "lora-state/state.json"), "state.json is damaged"),
    "truncated state.pt": (lambda out: _damage(out, "lora-state/state.pt"), "state.pt is damaged or truncated"),
    "missing trained weights": (lambda out: (out / "lora-state" / "trained.safetensors").unlink(),
                                "trained.safetensors is missing"),
    "unknown state version": (lambda out: _edit_state(out, version=99), "state format 99, this trainer reads 1"),
}


def _edit_state(out: Path, **changes) -> None:
    for folder in out.glob("*-state"):
        info = json.loads((folder / "state.json").read_text())
        info.update(changes)
        (folder / "state.json").write_text(json.dumps(info))


@pytest.mark.parametrize("fault", sorted(RESUME_FAULTS))
def test_damaged_states_are_named_before_loading(fault, saved_run, capsys):
    path, out = saved_run
    shutil.rmtree(out / "lora-step00000002-state")  # the damaged final state is the only one
    damage, fragment = RESUME_FAULTS[fault]
    damage(out)
    before = _snapshot(out)
    code, err = _resume(capsys, path)
    _assert_one_line(code, err, 2, "'save.resume' = 'latest'", fragment)
    assert _snapshot(out) == before


def test_resume_latest_with_nothing_to_resume(tiny_sd1, tiny_data, tmp_path, capsys):
    path = _write(tmp_path, _config(tiny_sd1, tiny_data, tmp_path))
    code, err = _resume(capsys, path)
    _assert_one_line(code, err, 2, "no readable saved state", str(tmp_path / "out"))


def test_resume_with_another_config_or_model_names_what_differs(saved_run, tiny_sd2, capsys):
    path, out = saved_run
    before = _snapshot(out)
    code, err = _resume(capsys, path, "--set", "network.network_dim=8",
                        "--set", f"model.pretrained_model_name_or_path=\"{tiny_sd2[0]}\"")
    _assert_one_line(code, err, 2, "was saved with another config; what differs:",
                     "model.pretrained_model_name_or_path: saved", "network.network_dim: saved 4, now 8")
    assert _snapshot(out) == before


def test_a_corrupt_older_state_does_not_stop_the_newer_one(saved_run, capsys):
    path, out = saved_run
    _damage(out, "lora-step00000002-state/state.json")
    (out / "lora.safetensors").unlink()  # so that the resumed run has a file to write
    shutil.move(out / "lora-state", out / "lora-step00000004-state")
    assert train_network.main(["--config", str(path), "--set", "save.resume=\"latest\""]) == 0
    err = capsys.readouterr()
    assert "the state is at step 4 of 4: no step is left; writing the final files" in err.out
    assert (out / "lora.safetensors").is_file()


def test_resume_of_a_finished_run_says_so_and_changes_nothing(saved_run, capsys):
    path, out = saved_run
    before = _snapshot(out)
    assert train_network.main(["--config", str(path), "--set", "save.resume=\"latest\""]) == 0
    assert "this run finished at step 4 (max_train_steps 4)" in capsys.readouterr().out
    after = _snapshot(out)
    assert {k: v for k, v in after.items() if k != "lora-config.toml"} == {
        k: v for k, v in before.items() if k != "lora-config.toml"}


def test_a_state_left_as_old_by_a_kill_is_recovered(saved_run, capsys):
    path, out = saved_run
    shutil.move(out / "lora-state", out / "lora-state.old")  # killed between save_folder's two renames
    (out / "lora.safetensors").unlink()
    assert train_network.main(["--config", str(path), "--set", "save.resume=\"latest\""]) == 0
    assert (out / "lora-state" / "state.json").is_file() and not (out / "lora-state.old").exists()


def test_resume_keeps_refusing_another_runs_files(saved_run, capsys):
    path, out = saved_run
    shutil.rmtree(out / "lora-state")
    (out / "lora.safetensors").write_bytes((out / "lora-step00000002.safetensors").read_bytes()[:0] + b"theirs")
    before = _snapshot(out)
    code, err = _resume(capsys, path)
    _assert_one_line(code, err, 2, f"{out / 'lora.safetensors'} was written by another run")
    assert _snapshot(out) == before


def test_resume_with_changed_data_is_refused_or_continues_when_asked(saved_run, capsys):
    path, out = saved_run
    caption = sorted((path.parent / "data").rglob("*.txt"))[0]
    caption.write_text("a different caption")
    shutil.rmtree(out / "lora-state")
    (out / "lora.safetensors").unlink()
    before = _snapshot(out)
    code, err = _resume(capsys, path)
    _assert_one_line(code, err, 2, "the data changed since lora-step00000002-state was saved: 1 images with "
                     f"another caption or size (e.g. {caption.with_suffix('.png')}",
                     "'save.resume_with_changed_data' = true")
    assert _snapshot(out) == before
    assert train_network.main(["--config", str(path), "--set", "save.resume=\"latest\"",
                               "--set", "save.resume_with_changed_data=true"]) == 0
    assert "continuing at its step with a new epoch" in capsys.readouterr().out
    assert (out / "lora.safetensors").is_file()


# ---- during and after training --------------------------------------------------------------------


def test_train_db_stops_on_a_bad_image_with_exit_code_3(tiny_sd1, tiny_data, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    bad = data / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)
    path = _write(tmp_path, _config(tiny_sd1, tiny_data, tmp_path, dataset={"train_data_dir": str(data)}))
    before = _snapshot(tmp_path)
    code, err = _run(capsys, "db", "--config", path)
    _assert_one_line(code, err, 3, "broken.png")
    assert _snapshot(tmp_path) == before


def test_a_loss_that_stays_nan_stops_with_one_line(tiny_sd1, tiny_data, tmp_path, capsys, monkeypatch):
    import library.training

    real = library.training.batch_loss
    monkeypatch.setattr(library.training, "batch_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    path = _write(tmp_path, _config(tiny_sd1, tiny_data, tmp_path, train={"nan_skip_limit": 2}))
    code, err = _run(capsys, "db", "--config", path)
    _assert_one_line(code, err, 3, "training stopped: 2 steps in a row had NaN/inf losses", alone=False)


FILE_LIMIT = """
import resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # Python ignores SIGXFSZ: writes fail with EFBIG
import train_network
sys.exit(train_network.main(sys.argv[2:]))
"""


def test_a_file_size_limit_at_save_is_one_line_and_earlier_files_are_intact(tiny_sd1, tiny_data, tmp_path):
    path = _write(tmp_path, _config(tiny_sd1, tiny_data, tmp_path, save={"save_every_n_steps": 1}))
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.safetensors").write_bytes(b"the user's own file")
    before = _snapshot(tmp_path)
    run = subprocess.run([sys.executable, "-c", FILE_LIMIT, "30000", "--config", str(path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    _assert_one_line(run.returncode, run.stderr, 2, "'train.output_dir': cannot write",
                     "lora-step00000001: File too large (this save needs about 0.2 MB", "Earlier files are intact",
                     alone=False)  # bitsandbytes may say something on stderr at import
    after = _snapshot(tmp_path)
    assert {k: after[k] for k in before if k != "out/.latent-trainer.lock"} == {
        k: v for k, v in before.items() if k != "out/.latent-trainer.lock"}
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_network_alpha_zero_means_alpha_equals_dim(tiny_sd1, tiny_data, tmp_path):
    from safetensors import safe_open

    path = _write(tmp_path, _config(tiny_sd1, tiny_data, tmp_path, network={"network_alpha": 0.0}))
    assert train_network.main(["--config", str(path)]) == 0
    with safe_open(tmp_path / "out" / "lora.safetensors", "pt") as f:
        assert f.metadata()["ss_network_alpha"] == "4.0"
        alphas = {float(f.get_tensor(k)) for k in f.keys() if k.endswith(".alpha")}
    assert alphas == {4.0}


def test_train_db_finishes_from_a_state_saved_during_its_last_step(tiny_sd1, tiny_data, tmp_path, capsys):
    """As after a SIGTERM in the final step: a state at max_train_steps and no final file yet."""
    config = _config(tiny_sd1, tiny_data, tmp_path, dreambooth={"train_text_encoder": False},
                     save={"save_state": True})
    path = _write(tmp_path, config)
    assert train_db.main(["--config", str(path)]) == 0
    out = tmp_path / "out"
    final = (out / "lora.safetensors").read_bytes()
    (out / "lora.safetensors").unlink()
    shutil.move(out / "lora-state", out / "lora-step00000002-state")
    assert train_db.main(["--config", str(path), "--set", "save.resume=\"latest\""]) == 0
    assert "the state is at step 2 of 2: no step is left; writing the final files" in capsys.readouterr().out
    from safetensors.torch import load

    a, b = load(final), load((out / "lora.safetensors").read_bytes())
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # the weights the run ended with
