"""accelerate's engines (library/engines.py): which engine the launch environment names, what each refuses
before any model loads (the README's engine matrix), the process-group and DDP settings, and the wrapper the
step calls. The multi-process runs themselves are tests/test_multiprocess.py."""
from datetime import timedelta

import pytest
import torch

from library.engines import (Engined, accelerator_settings, engine_problems, launched_engine, launched_processes,
                             prepare_trained)

# what `accelerate launch` puts in each process' environment (accelerate 1.15, utils/launch.py)
DDP = {"WORLD_SIZE": "4", "ACCELERATE_USE_CPU": "false"}
DEEPSPEED = {"WORLD_SIZE": "4", "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}
FSDP1 = {"WORLD_SIZE": "4", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}
FSDP2 = {"WORLD_SIZE": "4", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}


@pytest.mark.parametrize("env, engine", [({}, "single"), ({"WORLD_SIZE": "1"}, "single"), (DDP, "ddp"),
                                         (DEEPSPEED, "deepspeed"), (FSDP1, "fsdp1"), (FSDP2, "fsdp2"),
                                         ({"ACCELERATE_USE_FSDP": "True", "WORLD_SIZE": "2"}, "fsdp1")])
def test_the_engine_is_read_as_accelerate_launch_sets_it(env, engine):
    assert launched_engine(env) == engine
    assert launched_processes(env) == int(env.get("WORLD_SIZE", 1))


def _problems(make_config, env, recipe="db", **sections):
    return engine_problems(make_config(**sections), recipe, env)


def test_one_process_and_ddp_accept_what_they_can_run(make_config):
    fused = {"optimizer": {"fused_backward_pass": True, "optimizer_type": "Adafactor"}}
    assert _problems(make_config, {}, **fused, train={"blocks_to_swap": 2, "gradient_checkpointing": True}) == []
    assert _problems(make_config, DDP) == [] and _problems(make_config, DDP, "network") == []
    # an adapter with block swap: the adapter's weights stay on the device, DDP's buckets with them
    assert _problems(make_config, DDP, "network", train={"blocks_to_swap": 2, "gradient_checkpointing": True}) == []


def test_ddp_refuses_the_fused_backward_pass_and_train_db_block_swap(make_config):
    fused = _problems(make_config, DDP, optimizer={"fused_backward_pass": True, "optimizer_type": "Adafactor"})
    assert len(fused) == 1 and "before DDP has averaged its gradient over the 4 processes" in fused[0]
    assert "AdamW8bit / Adafactor" in fused[0]
    groups = _problems(make_config, DDP, optimizer={"fused_optimizer_groups": 4})
    assert len(groups) == 1 and "fused_optimizer_groups" in groups[0]
    swap = _problems(make_config, DDP, optimizer={"fused_backward_pass": True, "optimizer_type": "Adafactor"},
                     train={"blocks_to_swap": 2, "gradient_checkpointing": True})
    assert len(swap) == 2 and "'train.blocks_to_swap' in train_db.py" in swap[1]


NO_TE = {"dreambooth": {"train_text_encoder": False}}


@pytest.mark.parametrize("env, recipe, says", [
    (DEEPSPEED, "network", "does not help adapter training"), (FSDP2, "network", "does not help adapter training"),
    (FSDP1, "db", "FSDP version 1"), (FSDP1, "network", "FSDP version 1")])
def test_engines_refused_outright_say_what_to_use_instead(make_config, env, recipe, says):
    problems = _problems(make_config, env, recipe)
    assert len(problems) == 1 and says in problems[0]
    assert "`accelerate config` again with" in problems[0]


def test_fsdp2_runs_a_full_fine_tune_and_names_what_it_cannot(make_config):
    """FSDP2 accepts a full fine-tune of the denoiser, with trained text encoders and EMA; everything else is
    named at once, each with what to use."""
    assert _problems(make_config, FSDP2, **NO_TE) == []
    assert _problems(make_config, FSDP2, dreambooth={"train_text_encoder": True, "use_ema": True}) == []
    own_wrapping = {**FSDP2, "FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP"}
    problems = _problems(make_config, own_wrapping,
                         optimizer={"fused_backward_pass": True, "optimizer_type": "Adafactor"},
                         train={"blocks_to_swap": 2, "gradient_checkpointing": True, "full_bf16": True,
                                "mixed_precision": "bf16", "torch_compile": True},
                         dreambooth={"train_text_encoder": True, "use_ema": True})
    assert [p.split(" ")[0] for p in problems] == [
        "'optimizer.fused_backward_pass'", "'train.blocks_to_swap'", "'dreambooth.train_text_encoder'",
        "'train.full_fp16'", "'train.torch_compile'"]  # use_ema runs: each process averages its shards
    assert "(--fsdp_auto_wrap_policy SIZE_BASED_WRAP)" in problems[2]
    assert "without --fsdp_auto_wrap_policy" in problems[2]
    assert "sharded in fp32" in problems[3]
    assert _problems(make_config, own_wrapping, **NO_TE) == []  # the launch's wrapping of the denoiser alone


def test_deepspeed_runs_a_full_fine_tune_of_the_denoiser_and_names_what_it_cannot(make_config, monkeypatch):
    """Not installed: one line saying so (and FSDP2 instead). Installed: a full fine-tune of the denoiser runs;
    what ZeRO cannot shard, an optimizer CPU offload would replace and the launch values that differ from the
    config are named all at once."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    missing = _problems(make_config, DEEPSPEED, **NO_TE)
    assert len(missing) == 1 and "DeepSpeed, which is not installed (`pip install deepspeed`" in missing[0]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "deepspeed" else real(name, *a))
    assert _problems(make_config, DEEPSPEED, **NO_TE) == []
    env = {**DEEPSPEED, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4",
           "ACCELERATE_GRADIENT_CLIPPING": "1.0", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}
    problems = _problems(make_config, env, optimizer={"optimizer_type": "AdamW8bit", "max_grad_norm": 0.5},
                         train={"blocks_to_swap": 2, "gradient_checkpointing": True, "full_bf16": True,
                                "mixed_precision": "bf16", "torch_compile": True},
                         dreambooth={"use_ema": True})
    assert [p.split(" ")[0] for p in problems] == [
        "'optimizer.fused_backward_pass'", "'optimizer.optimizer_type'", "'dreambooth.train_text_encoder':",
        "'dreambooth.use_ema'", "'train.full_fp16'", "'train.torch_compile'", "'optimizer.optimizer_type'",
        "'train.gradient_accumulation_steps'", "'optimizer.max_grad_norm'"]
    assert "AdamW8bit" in problems[1] and "fp32 master weights" in problems[4]
    assert "use ZeRO-2" in problems[5]
    assert "would replace AdamW8bit with Adam" in problems[6] and "the DeepSpeed launch says 4" in problems[7]
    same = {**env, "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "1", "ACCELERATE_GRADIENT_CLIPPING": "auto",
            "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "none"}
    assert _problems(make_config, same, dreambooth={"use_ema": True, "train_text_encoder": False},
                     train={"torch_compile": True}) == []  # ZeRO-1/2 compile (tests/test_deepspeed.py)


def test_deepspeed_offload_needs_a_cpu_adam_that_can_build(make_config, monkeypatch):
    """CPU offload steps the optimizer state with DeepSpeed's CPU Adam, compiled on first use: without a prebuilt
    op, a C++ compiler or ninja the launch is refused before loading, naming what is missing."""
    pytest.importorskip("deepspeed")
    import deepspeed.git_version_info as built
    import torch.utils.cpp_extension

    from library.engines import cpu_adam_problem

    env = {**DEEPSPEED, "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}
    monkeypatch.setitem(built.installed_ops, "cpu_adam", False)
    monkeypatch.setattr(torch.utils.cpp_extension, "is_ninja_available", lambda: False)
    monkeypatch.setenv("CXX", "no-such-compiler")
    assert cpu_adam_problem() == "deepspeed has no prebuilt CPU Adam and a C++ compiler and ninja not found"
    problems = _problems(make_config, env, optimizer={"optimizer_type": "AdamW"}, **NO_TE)
    assert len(problems) == 1 and "needs its CPU Adam, which cannot be built here" in problems[0]
    monkeypatch.setitem(built.installed_ops, "cpu_adam", True)
    assert cpu_adam_problem() is None and _problems(make_config, env, **NO_TE) == []


def test_deepspeed_plugin_takes_the_config_values(make_config, monkeypatch):
    """The plugin accelerate is given: the launch's ZeRO stage, the config's accumulation and clipping (0: none),
    no zero.Init at load time, and bf16 as torch autocast over fp32 weights, gradients reduced in fp32."""
    pytest.importorskip("deepspeed")
    from library.engines import deepspeed_plugin

    for key, value in DEEPSPEED.items():
        monkeypatch.setenv(key, value)
    plugin = deepspeed_plugin(make_config(train={"gradient_accumulation_steps": 3, "mixed_precision": "bf16"},
                                          optimizer={"max_grad_norm": 0.5}))
    config = plugin.deepspeed_config
    assert (plugin.zero_stage, config["zero_optimization"]["stage"], config["gradient_accumulation_steps"],
            config["gradient_clipping"], plugin.zero3_init_flag) == (2, 2, 3, 0.5, False)
    assert config["bf16"] == {"enabled": False}
    assert config["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    unclipped = deepspeed_plugin(make_config(optimizer={"max_grad_norm": 0.0})).deepspeed_config
    assert unclipped["gradient_clipping"] == 0.0  # not left out: DeepSpeed's default clips at 1.0
    assert "bf16" not in unclipped and "torch_autocast" not in unclipped


def test_a_deepspeed_state_resumes_under_deepspeed_with_its_stage_and_resharded_only_for_adam(tmp_path, monkeypatch):
    """Another number of processes: Adam / AdamW's state is resharded (DeepSpeed's universal checkpoint carries
    exp_avg, exp_avg_sq and step); any other optimizer's, or AMSGrad's max_exp_avg_sq, would be lost: refused
    with the count that resumes it."""
    from library.config import ConfigError
    from library.saved_state import _check_engine

    info = {"sharded": "deepspeed", "processes": 2, "config": {"optimizer": {"optimizer_type": "SGDNesterov"}}}
    adamw = {**info, "config": {"optimizer": {"optimizer_type": "AdamW", "optimizer_args": ["weight_decay=0.1"]}}}
    for key, value in {**DEEPSPEED, "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    _check_engine(tmp_path, info)
    model = tmp_path / "sharded" / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"")  # ZeRO-3 writes each process' partition of the weights
    with pytest.raises(ConfigError, match="saved under ZeRO-3, this run is launched with ZeRO-2: resume it with "
                                          "`--zero_stage 3`"):
        _check_engine(tmp_path, info)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    _check_engine(tmp_path, info)
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="ZeRO partitions of 2 processes, this run has 4: its optimizer is "
                                          "SGDNesterov, and DeepSpeed reshards the state of Adam / AdamW only; "
                                          "resume it with `--num_processes 2`"):
        _check_engine(tmp_path, info)
    _check_engine(tmp_path, adamw)  # resharded as it loads
    adamw["config"]["optimizer"]["optimizer_args"] = ["amsgrad = True"]
    with pytest.raises(ConfigError, match="amsgrad, whose max_exp_avg_sq DeepSpeed's resharding does not carry"):
        _check_engine(tmp_path, adamw)
    with pytest.raises(ConfigError, match="saved without DeepSpeed"):
        _check_engine(tmp_path, {"processes": 4})
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    with pytest.raises(ConfigError, match=r"\(this run: no DeepSpeed, 4 processes\)"):
        _check_engine(tmp_path, info)


def test_fsdp2_plugin_wraps_the_family_blocks_unless_the_launch_names_its_own(make_config):
    from library.engines import fsdp2_plugin

    plugin = fsdp2_plugin(make_config(), {})
    assert plugin.fsdp_version == 2 and plugin.transformer_cls_names_to_wrap == ["BasicTransformerBlock",
                                                                                  "ResnetBlock2D"]
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    own = fsdp2_plugin(make_config(), {"FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP"})
    assert own.transformer_cls_names_to_wrap is None


def test_every_family_names_block_classes_its_denoiser_has():
    """FSDP2's units: each family's block class names are classes diffusers defines for its denoiser (its
    models' attention, resnet and transformer modules)."""
    import importlib
    import pkgutil

    import diffusers.models.transformers as transformers

    from library.families import REGISTRY

    modules = [importlib.import_module(m) for m in ("diffusers.models.attention", "diffusers.models.resnet")]
    modules += [importlib.import_module(f"{transformers.__name__}.{info.name}")
                for info in pkgutil.iter_modules(transformers.__path__)]
    for family in REGISTRY.values():
        assert family.block_classes, family.name
        for name in family.block_classes:
            assert any(isinstance(getattr(m, name, None), type) for m in modules), (family.name, name)


def test_a_sharded_state_resumes_only_under_fsdp2_with_any_number_of_processes(tmp_path, monkeypatch):
    """An FSDP2 state (one shard per process) resumes under FSDP2 with any number of processes (the shards are
    resharded as they load); it does not resume without FSDP2, and a whole state does not resume under FSDP2.
    Checked with the config, before any model loads."""
    from library.config import ConfigError
    from library.saved_state import _check_engine

    info = {"sharded": "fsdp2", "processes": 2}
    for key, value in {**FSDP2, "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    _check_engine(tmp_path, info)
    for processes in ("1", "3", "4"):
        monkeypatch.setenv("WORLD_SIZE", processes)
        _check_engine(tmp_path, info)
    with pytest.raises(ConfigError, match="saved without FSDP2"):
        _check_engine(tmp_path, {"processes": 4})
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    with pytest.raises(ConfigError, match=r"FSDP2 shards of 2 processes: resume it with `accelerate launch "
                                          r"--use_fsdp --fsdp_version 2` \(with any number of processes; this run: "
                                          r"no FSDP2, 4 processes\)"):
        _check_engine(tmp_path, info)


def test_the_refusal_comes_before_anything_loads(make_config, monkeypatch):
    """The recipe stops at refuse_unsupported, before the Accelerator (which would fail itself on a DeepSpeed
    environment without deepspeed installed) and before the model loads."""
    import library.model_files
    from library.config import ConfigError
    from train_db import train

    for key, value in DEEPSPEED.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(library.model_files, "load_model", lambda cfg: pytest.fail("the model loaded"))
    with pytest.raises(ConfigError, match="'dreambooth.train_text_encoder': accelerate gives DeepSpeed one model"):
        train(make_config(dreambooth={"train_text_encoder": True}))


def test_ddp_timeout_and_ddp_keys_reach_accelerate(make_config, tmp_path):
    """sd-scripts' ddp_timeout (minutes) becomes the process group's timeout; our default outlasts PyTorch's
    10-minute watchdog, which would kill the waiting ranks while rank 0 caches latents or makes class images."""
    group, ddp = accelerator_settings(make_config())["kwargs_handlers"]
    assert group.to_kwargs() == {"timeout": timedelta(minutes=180)}
    assert ddp.to_kwargs() == {"find_unused_parameters": True}
    group, ddp = accelerator_settings(make_config(train={"ddp_timeout": 30, "ddp_gradient_as_bucket_view": True,
                                                         "ddp_static_graph": True}))["kwargs_handlers"]
    assert group.to_kwargs() == {"timeout": timedelta(minutes=30)}
    assert ddp.to_kwargs() == {"find_unused_parameters": True, "gradient_as_bucket_view": True, "static_graph": True}


def test_sd_scripts_ddp_flags_are_read(tiny_sd1, tiny_data, tmp_path):
    from library.config_files import load_config
    from library.sd_args import parse

    args = parse([f"--pretrained_model_name_or_path={tiny_sd1[0]}", "--train_data_dir", str(tiny_data),
                  "--output_dir", str(tmp_path / "out"), "--ddp_timeout", "45", "--ddp_gradient_as_bucket_view",
                  "--ddp_static_graph"], "test")
    t = load_config(None, args.overrides, flags=args.flags).train
    assert (t.ddp_timeout, t.ddp_gradient_as_bucket_view, t.ddp_static_graph) == (45, True, True)


def test_engined_calls_the_wrapper_and_reads_the_bare_module():
    bare = torch.nn.Linear(2, 3)
    bare.config = {"kind": "linear"}
    calls = []

    def wrapper(*args, **kwargs):
        calls.append((args, kwargs))
        return bare(*args, **kwargs)

    engined = Engined(wrapper, bare)
    out = engined(torch.ones(1, 2))
    assert len(calls) == 1 and torch.equal(out, bare(torch.ones(1, 2)))
    assert engined.config == {"kind": "linear"} and engined.weight is bare.weight and engined.out_features == 3


def test_one_process_trains_the_bare_modules(make_config):
    """With one process nothing is wrapped: the step's parts are the run's parts, each trained module once."""
    from accelerate import Accelerator

    from library.families.base import Components

    unet, te = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    parts = Components(denoiser=unet, vae=torch.nn.Identity(), text_encoders={"te": te}, tokenizers={},
                       noise_scheduler=None)
    prepared = prepare_trained(Accelerator(), parts, [unet, te, unet])
    assert prepared.step_parts is parts and prepared.engine_modules == [unet, te]


def test_a_state_of_n_processes_goes_on_at_the_same_global_batch_with_m(make_config):
    """batches_done counts one process' batches: 3 done by each of 2 processes are 6 of the epoch, which 4
    processes continue after 4 (1 each; 2 batches seen again), and one process after 6."""
    from library.checkpoint import Checkpointer, Position

    said = []
    checkpoints = Checkpointer(make_config(), lambda stem: [], {}, None, None, {}, say=said.append)
    order = torch.tensor([1, 2, 3])
    assert checkpoints._reshared(Position(5, 2, 3, order), 2, 2).batches_done == 3 and not said
    four = checkpoints._reshared(Position(5, 2, 3, order), 2, 4)
    assert (four.step, four.epoch, four.batches_done, four.epoch_order) == (5, 2, 1, order)
    assert said[-1] == ("the state was saved by 2 processes, this run has 4: the epoch goes on after 4 of its "
                        "batches (2 seen again)")
    assert checkpoints._reshared(Position(5, 2, 3, order), 2, 1).batches_done == 6


def test_a_non_finite_loss_still_joins_the_all_reduce_with_several_processes():
    """With DDP every process must run backward (the others wait on its buckets); the step is skipped on all
    of them because the non-finite gradients reach every process. The guard reads the losses once per step
    (not before backward), so backward always runs; read before backward (the fused backward pass, one process
    only) a non-finite loss skips it, unless several processes must still join the all-reduce."""
    from library.guards import NonFiniteGuard

    plain = NonFiniteGuard(5)
    assert plain.loss_ok(torch.tensor(float("nan"))) is True and not bool(plain._losses_finite)
    fused_one, fused_several = NonFiniteGuard(5, before_backward=True), NonFiniteGuard(5, before_backward=True)
    assert fused_one.loss_ok(torch.tensor(float("nan"))) is False and fused_one._bad_loss
    assert fused_several.loss_ok(torch.tensor(float("nan")), processes=2) is True and fused_several._bad_loss
    assert NonFiniteGuard(5).loss_ok(torch.tensor(1.0), processes=2) is True


def test_a_step_deepspeed_skipped_counts_as_non_finite():
    """DeepSpeed steps (or skips, on non-finite gradients) inside accelerator.backward: the loop reads its skip as
    the step's verdict (so the guard says so and counts it); without DeepSpeed the accelerated optimizer's flag is
    not read (it is the fp16 scaler's, known only after step)."""
    from types import SimpleNamespace

    from library.engines import Prepared
    from train_db import _known_bad

    skipped = SimpleNamespace(step_was_skipped=True)
    assert _known_bad(skipped, False, Prepared([], None, steps_in_backward=True)) is True
    taken = SimpleNamespace(step_was_skipped=False)
    assert _known_bad(taken, False, Prepared([], None, steps_in_backward=True)) is False
    assert _known_bad(skipped, False, Prepared([], None)) is False
    fused = SimpleNamespace(pop_nonfinite=lambda: "flag")
    assert _known_bad(fused, True, Prepared([], None)) == "flag"


def test_trained_text_encoders_are_sharded_with_the_denoiser_each_its_own_unit():
    """FSDP2 with train_text_encoder: one module for accelerate (no parameter of its own) holding the denoiser
    and the trained encoders; the plugin wraps each of them and the encoders' layers (the names transformers
    gives, those present); an encoder FSDP2's saving could not rebuild is refused before training."""
    import types

    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from library.config import ConfigError
    from library.engines import sharded_together

    encoder = CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                           num_attention_heads=2, vocab_size=100, max_position_embeddings=16))
    denoiser, frozen = torch.nn.Linear(2, 2), torch.nn.Linear(3, 3)
    parts = types.SimpleNamespace(denoiser=denoiser, text_encoders={"te": encoder, "te2": frozen})
    plugin = types.SimpleNamespace(transformer_cls_names_to_wrap=["BasicTransformerBlock"])
    together = sharded_together(plugin, parts, [denoiser, encoder])
    assert dict(together.named_children()) == {"denoiser": denoiser, "te": encoder}
    assert not list(together.named_parameters(recurse=False))
    names = plugin.transformer_cls_names_to_wrap
    assert names[:3] == ["BasicTransformerBlock", "Linear", "CLIPTextModel"]
    assert sorted(names[3:]) == ["CLIPEncoderLayer", "CLIPTextEmbeddings"]  # not CLIPVisionEmbeddings
    with pytest.raises(ConfigError, match=r"the text encoder te2 \(Linear\) cannot be gathered"):
        sharded_together(plugin, parts, [denoiser, frozen])


def test_an_unsharded_copy_holds_the_state_and_the_buffers_no_state_dict_holds():
    """The copy saving writes (made on the meta device from the config): the given weights, and CLIP's
    non-persistent position_ids copied from the module, so no tensor of it is left on the meta device."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from library.engines import unsharded_copy

    encoder = CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                           num_attention_heads=2, vocab_size=100, max_position_embeddings=16))
    state = {k: v + 1 for k, v in encoder.state_dict().items()}
    copy = unsharded_copy(encoder, state)
    assert type(copy) is CLIPTextModel and not any(t.is_meta for t in [*copy.parameters(), *copy.buffers()])
    assert all(torch.equal(copy.state_dict()[k], state[k]) for k in state)
    buffers = dict(encoder.named_buffers())
    assert list(buffers) == ["embeddings.position_ids"] and "embeddings.position_ids" not in state
    assert torch.equal(dict(copy.named_buffers())["embeddings.position_ids"], buffers["embeddings.position_ids"])


def test_a_deepspeed_state_that_cannot_be_resharded_is_one_line_and_leaves_no_folder(tmp_path):
    """The universal conversion failing (here: a partition that is not a checkpoint) is a ConfigError naming the
    state, and its half-written folder goes; the state is untouched."""
    pytest.importorskip("deepspeed")
    from library.config import ConfigError
    from library.deepspeed_states import _convert

    shards = tmp_path / "run" / "last-state" / "sharded"
    (shards / "pytorch_model").mkdir(parents=True)
    (shards / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"last-state could not be resharded for this number of processes .*"
                                          r"resume it with as many processes as saved it"):
        _convert(shards, tmp_path / "out" / ".last-state-universal.tmp")
    assert not (tmp_path / "out" / ".last-state-universal.tmp").exists()
    assert [p.name for p in (shards / "pytorch_model").iterdir()] == ["zero_pp_rank_0_mp_rank_00_optim_states.pt"]


def _cpu_adam_built() -> bool:
    """DeepSpeed's CPU Adam op is already built in torch's extension cache (building it takes minutes, so the
    suite does not; `offload_optimizer_device cpu` builds it on first use)."""
    import os
    from pathlib import Path

    import torch.utils.cpp_extension as ext

    cache = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or ext._get_build_directory("cpu_adam", False)).parent
    return any(cache.glob("cpu_adam/*.so"))


@pytest.mark.skipif(not _cpu_adam_built(), reason="DeepSpeed's CPU Adam op is not built here (minutes to build)")
def test_cpu_adam_resumed_from_its_state_steps_exactly_as_uninterrupted():
    """CPU Adam's op keeps beta^t as a running product; a new op (a resumed run's) started from pow(beta, t)
    steps a rounding apart (Adam amplifies it where gradients are near 0). Replayed through the loaded steps on
    empty tensors, the resumed optimizer's third step is bit for bit the uninterrupted one's (and is not
    without the replay)."""
    pytest.importorskip("deepspeed")
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from library.deepspeed_states import replay_steps

    torch.manual_seed(0)
    start, grads = torch.randn(4096), [torch.randn(4096) * 10.0 ** -torch.randint(0, 9, (4096,)) for _ in range(3)]

    def stepped(weights, optimizer, gradients):
        for g in gradients:
            weights.grad = g.clone()
            optimizer.step()
        return weights

    def resumed(replay: bool):
        weights = torch.nn.Parameter(start.clone())
        first = DeepSpeedCPUAdam([weights], lr=1e-3)
        stepped(weights, first, grads[:2])
        again = DeepSpeedCPUAdam([weights], lr=1e-3)
        again.load_state_dict(first.state_dict())
        if replay:
            replay_steps(again)
        return stepped(weights, again, grads[2:]).detach()

    whole = torch.nn.Parameter(start.clone())
    uninterrupted = stepped(whole, DeepSpeedCPUAdam([whole], lr=1e-3), grads).detach()
    assert torch.equal(resumed(replay=True), uninterrupted)
    assert not torch.equal(resumed(replay=False), uninterrupted)
