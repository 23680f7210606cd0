"""Loading: a single file in the original layout and the diffusers folder give identical weights;
.ckpt only through weights-only unpickling; shipped architectures are recognised by shape."""
import pickle

import pytest
import torch

from library.families.base import ModelSource
from library.families.sd1 import SD1Family, detect_arch
from library.loading import CheckpointError, arch_dir, read_checkpoint
from model_checks import assert_same_weights


@pytest.mark.parametrize("model", ["tiny_sd1", "tiny_sd2"])
def test_single_file_and_folder_give_identical_weights(model, request):
    folder, single = request.getfixturevalue(model)
    family = SD1Family()
    a = family.load(ModelSource(str(folder)))
    b = family.load(ModelSource(str(single), arch=str(folder), tokenizer=str(folder / "tokenizer")))
    assert_same_weights(a, b)
    assert a.tokenizers["te"]("a red dog").input_ids == b.tokenizers["te"]("a red dog").input_ids
    assert a.extra["v2"] == b.extra["v2"] == (model == "tiny_sd2")


def test_ckpt_loads_weights_only(tiny_sd1, tmp_path):
    state = read_checkpoint(tiny_sd1[1])
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": state, "global_step": 10}, ckpt)
    again = read_checkpoint(ckpt)
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)


class _RunsCode:
    def __reduce__(self):
        return (print, ("this would have run",))


def test_ckpt_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _RunsCode()}, path)
    with pytest.raises(CheckpointError, match="refused to load.*could run code"):
        read_checkpoint(path)
    path.write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(CheckpointError):
        read_checkpoint(path)


@pytest.mark.parametrize("arch, width, context", [("sd15", 320, 768), ("sd2", 320, 1024)])
def test_shipped_architecture_detected_from_key_shapes(arch, width, context):
    prefix = "model.diffusion_model."
    fake = {prefix + "input_blocks.0.0.weight": torch.empty(width, 4, 3, 3),
            prefix + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.empty(width, context)}
    assert detect_arch(fake) == arch_dir(arch)


def test_unknown_architecture_asks_for_model_arch():
    prefix = "model.diffusion_model."
    fake = {prefix + "input_blocks.0.0.weight": torch.empty(32, 4, 3, 3),
            prefix + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.empty(32, 32)}
    with pytest.raises(CheckpointError, match="set model.arch"):
        detect_arch(fake)


def test_not_an_sd_checkpoint_is_named(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"transformer.blocks.0.weight": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="other.safetensors: no 'model.diffusion_model.\\*' keys"):
        SD1Family().load(ModelSource(str(path)))


def test_separate_vae_file_or_folder(tiny_sd1, tmp_path):
    """`model.vae`: a standalone VAE single file (bare LDM keys, as vae-ft-mse files have) or a folder."""
    from safetensors.torch import save_file

    from library.ldm_layout import vae_to_ldm

    folder, _ = tiny_sd1
    family = SD1Family()
    reference = family.load(ModelSource(str(folder))).vae.state_dict()
    torch.manual_seed(5)
    changed = {k: v + torch.randn_like(v) if v.is_floating_point() else v for k, v in reference.items()}
    bare = {k.removeprefix("first_stage_model."): v.contiguous() for k, v in vae_to_ldm(changed).items()}
    save_file(bare, str(tmp_path / "vae.safetensors"))
    loaded = family.load(ModelSource(str(folder), vae=str(tmp_path / "vae.safetensors"), arch=str(folder)))
    assert all(torch.equal(loaded.vae.state_dict()[k], changed[k]) for k in changed)
    from_folder = family.load(ModelSource(str(folder), vae=str(folder / "vae"))).vae.state_dict()
    assert all(torch.equal(from_folder[k], reference[k]) for k in reference)


@pytest.mark.parametrize("what, family, files", [
    ("sd3", "sd3", ["x", "x.safetensors", "x-transformer.safetensors", "x-clip_l.safetensors",
                    "x-clip_g.safetensors", "x-t5xxl.safetensors"]),
    ("flux-schnell", "flux", ["x", "x.safetensors", "x-clip_l.safetensors", "x-t5xxl.safetensors",
                              "x-ae.safetensors"])])
def test_tiny_cli_builds_every_family(what, family, files, tmp_path, capsys):
    """README: `python -m library.tiny <family> <out>` builds each family the tests use, in the layouts users have."""
    from library.families import get_family
    from library.tiny import main

    main([what, str(tmp_path / "x")])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'x'}, ")
    assert get_family("auto", str(tmp_path / "x")).name == family
    assert get_family("auto", str(tmp_path / "x.safetensors")).name == family


# ---- tokenizers fetched once when the network is allowed -------------------------------------------------

def _fake_hub(monkeypatch, tokenizer_folder, tmp_path):
    """huggingface_hub.snapshot_download replaced: records (repo, patterns) and returns a snapshot folder holding
    the tiny CLIP tokenizer in each subfolder the patterns ask for."""
    import shutil

    import huggingface_hub

    calls = []

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, tuple(allow_patterns)))
        folder = tmp_path / "hub" / repo_id.replace("/", "--")
        for sub in {p.rsplit("/", 1)[0] if "/" in p else "" for p in allow_patterns}:
            shutil.copytree(tokenizer_folder, folder / sub, dirs_exist_ok=True)
        return str(folder)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def _fetched(calls):
    """(repo, subfolder) of each download."""
    return [(repo, patterns[0].split("/")[0] if "/" in patterns[0] else "") for repo, patterns in calls]


def test_a_missing_clip_tokenizer_is_fetched_once_from_its_repo(tiny_sd1, monkeypatch, tmp_path):
    """A single SD1 file with no tokenizer in the cache (a fresh rented machine): the CLIP tokenizer is downloaded
    from openai/clip-vit-large-patch14, tokenizer files only, and loads."""
    calls = _fake_hub(monkeypatch, tiny_sd1[0] / "tokenizer", tmp_path)
    parts = SD1Family().load(ModelSource(str(tiny_sd1[1]), arch=str(tiny_sd1[0])))
    assert calls == [("openai/clip-vit-large-patch14", ("*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja"))]
    assert parts.tokenizers["te"]("a photo").input_ids[0] == parts.tokenizers["te"].bos_token_id


def _family_tokenizers(name):
    """Each family's tokenizer loading as its single-file loader calls it (no model.tokenizer)."""
    from library.families import chroma, flux, flux2, qwen_image, sd3, sdxl, zimage

    return {"sdxl": lambda: sdxl._tokenizers(sdxl.DEFAULT_TOKENIZERS),
            "sd3": lambda: sd3._tokenizers(sd3.DEFAULT_TOKENIZERS),
            "flux": lambda: flux._tokenizers(flux.DEFAULT_TOKENIZERS),
            "chroma": lambda: chroma._tokenizers(chroma.DEFAULT_TOKENIZER),
            "flux2-klein-4b": lambda: flux2._tokenizer(flux2.DEFAULT_TOKENIZERS["flux2-klein-4b"], "flux2-klein-4b"),
            "flux2-klein-9b": lambda: flux2._tokenizer(flux2.DEFAULT_TOKENIZERS["flux2-klein-9b"], "flux2-klein-9b"),
            "flux2-dev": lambda: flux2._tokenizer(flux2.DEFAULT_TOKENIZERS["flux2-dev"], "flux2-dev"),
            "qwen_image": lambda: qwen_image._tokenizer(qwen_image.DEFAULT_TOKENIZER),
            "zimage": lambda: zimage._tokenizer(zimage.DEFAULT_TOKENIZER)}[name]


@pytest.mark.parametrize("family, fetched", [
    ("sdxl", [("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer"),
              ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer_2")]),
    ("sd3", [("stabilityai/stable-diffusion-3-medium-diffusers", f"tokenizer{n}") for n in ("", "_2", "_3")]),
    ("flux", [("black-forest-labs/FLUX.1-dev", "tokenizer"), ("black-forest-labs/FLUX.1-dev", "tokenizer_2")]),
    ("chroma", [("lodestones/Chroma1-HD", "tokenizer")]),
    ("flux2-klein-4b", [("black-forest-labs/FLUX.2-klein-4B", "tokenizer")]),
    ("flux2-klein-9b", [("black-forest-labs/FLUX.2-klein-9B", "tokenizer")]),
    ("flux2-dev", [("black-forest-labs/FLUX.2-dev", "tokenizer")]),
    ("qwen_image", [("Qwen/Qwen-Image", "tokenizer")]),
    ("zimage", [("Tongyi-MAI/Z-Image-Turbo", "tokenizer")])])
def test_each_family_fetches_its_tokenizers_from_its_repo(family, fetched, tiny_sd1, monkeypatch, tmp_path):
    calls = _fake_hub(monkeypatch, tiny_sd1[0] / "tokenizer", tmp_path)
    loaded = _family_tokenizers(family)()
    assert _fetched(calls) == fetched
    assert all(t is not None for t in (loaded.values() if isinstance(loaded, dict) else [loaded]))


def test_a_model_folder_without_its_tokenizer_fetches_the_familys(tiny_sd1, monkeypatch, tmp_path):
    """A local folder (model.tokenizer, or the model's own folder) without the tokenizer: the family's repo."""
    from library.families import zimage

    calls = _fake_hub(monkeypatch, tiny_sd1[0] / "tokenizer", tmp_path)
    tokenizer = zimage._tokenizer(str(tmp_path))
    assert _fetched(calls) == [("Tongyi-MAI/Z-Image-Turbo", "tokenizer")] and tokenizer.padding_side == "right"


def test_offline_or_a_failed_fetch_is_one_line_naming_the_tokenizer(tiny_sd1, monkeypatch, tmp_path, config_error):
    """HF_HUB_OFFLINE = 1: no download, exit 2 with one line naming the tokenizer, where it was looked for and how
    to provide it; a download that fails says why, in the same line."""
    import huggingface_hub

    def unreachable(repo_id, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("cannot reach huggingface.co")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config, line = config_error({"pretrained_model_name_or_path": str(tiny_sd1[1]), "arch": str(tiny_sd1[0])},
                                "offline.toml")
    assert line == (f"config error: {config}: 'model.tokenizer': CLIP tokenizer not found in "
                    f"openai/clip-vit-large-patch14 nor in the Hugging Face cache of openai/clip-vit-large-patch14, "
                    f"and HF_HUB_OFFLINE is set (no download): set model.tokenizer to a folder holding its files, or "
                    f"fetch them once with network access (huggingface-cli download openai/clip-vit-large-patch14 "
                    f"--include '*'; a gated repo needs HF_TOKEN)")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(CheckpointError, match=r"Chroma T5 tokenizer not found in .*lodestones/Chroma1-HD, and "
                                              r"downloading it from lodestones/Chroma1-HD failed "
                                              r"\(LocalEntryNotFoundError: cannot reach huggingface.co\)"):
        from library.families import chroma

        chroma._tokenizers(chroma.DEFAULT_TOKENIZER)
