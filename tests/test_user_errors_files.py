"""Model and adapter files that cannot be used: each fault ends in exit code 2 and one "config error:" line naming
the config key and the file, through the real command line (train_network.main / train_db.main, and a subprocess
for two of them), with no traceback, and every file the user had byte-identical afterwards."""
import argparse
import json
import re
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import train_db
import train_network
from conftest import ROOT


PROGRESS_BAR = re.compile(r"\d+/\d+ \[\d+:\d+")  # tqdm's "52/52 [00:00<00:00, ...]"


@dataclass
class User:
    """A user's folder: the tiny SD1 model as a single file, its diffusers folder (arch and tokenizer), data."""
    root: Path
    single: Path
    folder: Path
    data: Path
    model: dict = field(default_factory=dict)
    network: dict = field(default_factory=dict)

    def file(self, name: str, data: bytes) -> Path:
        path = self.root / name
        path.write_bytes(data)
        return path

    def config(self, recipe: str) -> Path:
        model = {"pretrained_model_name_or_path": str(self.single), "arch": str(self.folder),
                 "tokenizer": str(self.folder / "tokenizer"), **self.model}
        model = {k: v for k, v in model.items() if v is not None}  # None: the key left out
        sections = {"model": model,
                    "dataset": {"train_data_dir": str(self.data), "resolution": 64, "train_batch_size": 2},
                    "train": {"output_dir": str(self.root / "out"), "output_name": "run", "max_train_steps": 1,
                              "seed": 7}}
        if recipe == "network":
            sections["network"] = {"network_dim": 4, "network_alpha": 2.0, **self.network}
        text = "\n".join(f"[{name}]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items())
                         for name, values in sections.items())
        path = self.root / f"{recipe}.toml"
        path.write_text(text + "\n")
        return path


@pytest.fixture
def user(tmp_path, tiny_sd1, tiny_data):
    root = tmp_path / "user"
    shutil.copytree(tiny_data, root / "data")
    shutil.copy(tiny_sd1[1], root / "model.safetensors")
    return User(root, root / "model.safetensors", tiny_sd1[0], root / "data")


def snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def truncated(user: User, name: str) -> tuple[Path, str]:
    whole = user.single.read_bytes()
    path = user.file(name, whole[: len(whole) // 2])
    return path, f"is truncated (header says {len(whole)} bytes, file has {len(whole) // 2})"


def adapter_file(user: User, name: str, metadata: dict) -> Path:
    path = user.root / name
    save_file({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}, str(path),
              metadata=metadata)
    return path


# ---- the faults: each sets up the user's folder and returns (config key, file named, what is said) ----------

def hub_offline(user, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    user.model["pretrained_model_name_or_path"] = "someone/not-cached-model"
    return ("model.pretrained_model_name_or_path", "someone/not-cached-model",
            "is a hub id that is not in the local Hugging Face cache, and HF_HUB_OFFLINE is set: download it first")


def hub_unreachable(user, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens, refused at once
    user.model["pretrained_model_name_or_path"] = "someone/not-cached-model"
    return ("model.pretrained_model_name_or_path", "someone/not-cached-model",
            "is a hub id that is not in the local Hugging Face cache, and 127.0.0.1 cannot be reached")


def sdxl_file_as_sd1(user, monkeypatch, tiny_sdxl):
    path = user.file("sdxl.safetensors", tiny_sdxl[1].read_bytes())
    user.model.update(pretrained_model_name_or_path=str(path), family="sd1", arch=str(tiny_sdxl[0]))
    return ("model.pretrained_model_name_or_path", path,
            "is a checkpoint of family \"sdxl\" (from its tensor names), but 'model.family' = \"sd1\": set "
            "model.family = \"sdxl\"")


def sd1_file_as_flux(user, monkeypatch):
    user.model["family"] = "flux"
    return ("model.pretrained_model_name_or_path", user.single,
            "is a checkpoint of family \"sd1\" (from its tensor names), but 'model.family' = \"flux\": set "
            "model.family = \"sd1\"")


def sdxl_folder_as_sd1(user, monkeypatch, tiny_sdxl):
    user.model.update(pretrained_model_name_or_path=str(tiny_sdxl[0]), family="sd1")
    return ("model.pretrained_model_name_or_path", tiny_sdxl[0],
            "is a model folder of family \"sdxl\", but 'model.family' = \"sd1\"")


def adapter_as_model(user, monkeypatch):
    path = adapter_file(user, "lora.safetensors", {})
    user.model["pretrained_model_name_or_path"] = str(path)
    return ("model.pretrained_model_name_or_path", path, "is not a checkpoint of any family this trainer knows")


def shapes_of_no_shipped_architecture(user, monkeypatch):
    user.model["arch"] = None  # the tiny U-Net's widths are no real model's: detected from the header's shapes
    return ("model.pretrained_model_name_or_path", user.single, "no shipped architecture has a U-Net with "
            "(in_channels, first width, cross-attention dim) = (4, 32, 32); set model.arch")


def flux_file_without_its_parts(user, monkeypatch):
    path = user.root / "flux1-dev.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2)}, str(path))
    user.model["pretrained_model_name_or_path"] = str(path)
    return ("model.pretrained_model_name_or_path", path, "a FLUX.1 transformer file holds the transformer only; "
            "set model.clip_l, model.t5xxl, model.ae to the separate files")


def model_truncated(user, monkeypatch):
    path, said = truncated(user, "cut.safetensors")
    user.model["pretrained_model_name_or_path"] = str(path)
    return "model.pretrained_model_name_or_path", path, said


def model_not_safetensors(user, monkeypatch):
    path = user.file("page.safetensors", b"<!DOCTYPE html><html>404 Not Found</html>")  # a saved error page
    user.model["pretrained_model_name_or_path"] = str(path)
    return ("model.pretrained_model_name_or_path", path, "is not a .safetensors file")


def model_damaged_header(user, monkeypatch):
    body = b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]'  # the closing brace lost
    path = user.file("damaged.safetensors", struct.pack("<Q", len(body)) + body + bytes(8))
    user.model["pretrained_model_name_or_path"] = str(path)
    return ("model.pretrained_model_name_or_path", path, "has a damaged header")


def model_empty(user, monkeypatch):
    path = user.file("empty.safetensors", b"")
    user.model["pretrained_model_name_or_path"] = str(path)
    return ("model.pretrained_model_name_or_path", path, "is empty (0 bytes): not a .safetensors file")


def part_truncated(key):
    def fault(user, monkeypatch):
        path, said = truncated(user, f"{key}.safetensors")
        user.model[key] = str(path)
        return f"model.{key}", path, said
    fault.__name__ = f"{key}_truncated"
    return fault


def folder_without_model(user, monkeypatch):
    folder = user.root / "downloads"
    folder.mkdir()
    (folder / "README.md").write_text("my models\n")
    user.model["pretrained_model_name_or_path"] = str(folder)
    return ("model.pretrained_model_name_or_path", folder,
            "is a folder without a model (no model_index.json, unet/ or transformer/")


def folder_holding_a_single_file(user, monkeypatch):
    folder = user.root / "checkpoints"
    folder.mkdir()
    shutil.copy(user.single, folder / "v1-5.safetensors")
    user.model["pretrained_model_name_or_path"] = str(folder)
    return ("model.pretrained_model_name_or_path", folder, "it holds v1-5.safetensors: give that file instead")


def folder_with_a_truncated_part(user, monkeypatch):
    folder = user.root / "tiny-sd1"
    shutil.copytree(user.folder, folder)
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    whole = unet.read_bytes()
    unet.write_bytes(whole[:-100])  # an interrupted download
    user.model["pretrained_model_name_or_path"] = str(folder)
    return ("model.pretrained_model_name_or_path", unet,
            f"is truncated (header says {len(whole)} bytes, file has {len(whole) - 100})")


def folder_missing_a_part(user, monkeypatch):
    folder = user.root / "tiny-sd1"
    shutil.copytree(user.folder, folder)
    shutil.rmtree(folder / "vae")
    user.model["pretrained_model_name_or_path"] = str(folder)
    return ("model.pretrained_model_name_or_path", folder, "has no vae/ (a sd1 model folder needs unet/, vae/, "
            "text_encoder/, scheduler/): an incomplete download?")


def folder_part_without_its_config(user, monkeypatch):
    """Found only while loading (diffusers' OSError), after the data check: named by the key all the same."""
    folder = user.root / "tiny-sd1"
    shutil.copytree(user.folder, folder)
    (folder / "unet" / "config.json").unlink()
    user.model["pretrained_model_name_or_path"] = str(folder)
    return ("model.pretrained_model_name_or_path", folder, "OSError: Error no file named config.json found in "
            "directory")


def ckpt_truncated_zip(user, monkeypatch):
    whole = user.root / "whole.ckpt"
    torch.save({"state_dict": load_file(user.single)}, whole)
    path = user.file("cut.ckpt", whole.read_bytes()[:4096])
    whole.unlink()
    user.model["pretrained_model_name_or_path"] = str(path)
    return ("model.pretrained_model_name_or_path", path, "is truncated (a zip-format torch checkpoint without its end")


def ckpt_constructs_objects(user, monkeypatch):
    path = user.root / "evil.ckpt"
    state = load_file(user.single)
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=1)}, path, _use_new_zipfile_serialization=False)
    user.model["pretrained_model_name_or_path"] = str(path)
    return ("model.pretrained_model_name_or_path", path, "refused to load: this pickle file contains objects other "
            "than tensors, and unpickling it could run code (it constructs argparse.Namespace)")


def network_weights_other_family(user, monkeypatch):
    path = adapter_file(user, "flux_lora.safetensors", {"ss_base_model_version": "flux1", "ss_network_dim": "4"})
    user.network["network_weights"] = str(path)
    return ("network.network_weights", path,
            "was made for flux1 (metadata ss_base_model_version), this model is sd1")


def network_weights_other_dim(user, monkeypatch):
    path = adapter_file(user, "dim8.safetensors", {"ss_base_model_version": "sd_v1", "ss_network_dim": "8"})
    user.network["network_weights"] = str(path)
    return ("network.network_weights", path, "has network_dim 8 (metadata ss_network_dim), the config says "
            "'network.network_dim' = 4: set it to 8")


def network_weights_truncated(user, monkeypatch):
    adapter = adapter_file(user, "whole.safetensors", {"ss_network_dim": "4"}).read_bytes()
    path = user.file("cut_lora.safetensors", adapter[:-10])
    (user.root / "whole.safetensors").unlink()
    user.network["network_weights"] = str(path)
    return ("network.network_weights", path, f"is truncated (header says {len(adapter)} bytes, file has "
                                             f"{len(adapter) - 10})")


NETWORK_FAULTS = [hub_offline, hub_unreachable, sdxl_file_as_sd1, sd1_file_as_flux, sdxl_folder_as_sd1,
                  adapter_as_model, shapes_of_no_shipped_architecture, flux_file_without_its_parts,
                  model_truncated, model_not_safetensors, model_damaged_header, model_empty,
                  *(part_truncated(k) for k in ("vae", "clip_l", "clip_g", "t5xxl", "ae")),
                  folder_without_model, folder_holding_a_single_file, folder_with_a_truncated_part,
                  folder_missing_a_part, folder_part_without_its_config,
                  ckpt_truncated_zip, ckpt_constructs_objects,
                  network_weights_other_family, network_weights_other_dim, network_weights_truncated]
DB_FAULTS = [hub_offline, sdxl_file_as_sd1, model_truncated, model_damaged_header, part_truncated("vae"),
             folder_without_model, folder_with_a_truncated_part, ckpt_constructs_objects]


def _set_up(fault, user, monkeypatch, request):
    extra = [request.getfixturevalue("tiny_sdxl")] if "tiny_sdxl" in fault.__code__.co_varnames else []
    return fault(user, monkeypatch, *extra)


def _run_main(main, config: Path, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(config)])
    return exit_.value.code, capsys.readouterr().err


def _assert_one_line(stderr: str, config: Path, key: str, named, said: str) -> None:
    """The message's first line (progress bars of the libraries that loaded a part before a load-time fault
    are not part of it) names the config, the key and the file; no traceback anywhere."""
    lines = [line for line in stderr.splitlines() if line.strip() and not PROGRESS_BAR.search(line)]
    first = lines[0]
    assert first == first.strip() and first.startswith(f"config error: {config}: '{key}': "), stderr
    assert str(named) in first and said in first, first
    assert "Traceback" not in stderr


RECIPE_FAULTS = [("network", fault) for fault in NETWORK_FAULTS] + [("db", fault) for fault in DB_FAULTS]


@pytest.mark.parametrize("recipe,fault", RECIPE_FAULTS, ids=lambda x: getattr(x, "__name__", x))
def test_each_recipe_names_the_file_and_key(recipe, fault, user, monkeypatch, capsys, request):
    key, named, said = _set_up(fault, user, monkeypatch, request)
    config = user.config(recipe)
    before = snapshot(user.root)
    capsys.readouterr()  # what building the fixtures printed
    main = train_network.main if recipe == "network" else train_db.main
    code, stderr = _run_main(main, config, capsys)
    assert code == 2
    _assert_one_line(stderr, config, key, named, said)
    after = snapshot(user.root)
    assert {p: after.get(p) for p in before} == before  # every file the user had, byte-identical


@pytest.mark.parametrize("recipe, fault", [("train_network.py", model_truncated),
                                           ("train_db.py", folder_without_model)])
def test_as_a_subprocess_no_traceback(recipe, fault, user, monkeypatch):
    key, named, said = fault(user, monkeypatch)
    config = user.config("network" if recipe == "train_network.py" else "db")
    before = snapshot(user.root)
    run = subprocess.run([sys.executable, str(ROOT / recipe), "--config", str(config)], cwd=user.root,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-3000:]
    _assert_one_line(run.stderr, config, key, named, said)
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    after = snapshot(user.root)
    assert {p: after.get(p) for p in before} == before


def test_legacy_ckpt_without_objects_trains(user, capsys):
    """A harmless legacy (non-zip) .ckpt: read weights-only, in memory (mmap needs the zip format)."""
    path = user.root / "legacy.ckpt"
    state = load_file(user.single)
    torch.save({"state_dict": state, "global_step": 3}, path, _use_new_zipfile_serialization=False)
    user.model["pretrained_model_name_or_path"] = str(path)
    assert train_network.main(["--config", str(user.config("network"))]) == 0
    saved = load_file(user.root / "out" / "run.safetensors")
    assert any(k.startswith("lora_unet_") for k in saved) and any(k.startswith("lora_te_") for k in saved)


def test_file_errors_come_before_the_data_check(user, monkeypatch, capsys):
    """A truncated model and a truncated image: the model is named first (its check reads headers only)."""
    key, named, said = model_truncated(user, monkeypatch)
    image = next(user.data.rglob("*.png"))
    image.write_bytes(image.read_bytes()[:60])
    config = user.config("network")
    code, stderr = _run_main(train_network.main, config, capsys)
    assert code == 2
    _assert_one_line(stderr, config, key, named, said)
    assert "dataset error" not in stderr and str(image) not in stderr
