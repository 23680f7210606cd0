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
