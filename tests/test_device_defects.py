"""GPU-only defects (issue 15), each shown on the test accelerator (tests/fake_device.py) or, where the defect
needs no device, on the host. Every test names its defect number."""
import pytest
import torch

import fake_device
from conftest import train_db, train_network

CHECKPOINTED = {"gradient_checkpointing": True}
FUSED = {"optimizer_type": "AdamW", "fused_backward_pass": True, "learning_rate": 1e-4, "max_grad_norm": 0.0}


def _prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle --d 3 --s 2\n")
    return str(path)


def _tensor_state(optimizer, param):
    state = optimizer.state_of(param)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim() > 0}


def test_block_swap_keeps_swapping_after_sampling(flux_config, tmp_path, gpu):
    """Defect 1: after a sample, the denoiser went back with module.to(`fakegpu:0`), which is not the swapper's
    `fakegpu`: every swapped block stayed on the device."""
    result = train_network(flux_config(train={**CHECKPOINTED, "blocks_to_swap": 2},
                               sample={"sample_prompts": _prompts(tmp_path), "sample_at_first": True}))
    swapper = result.parts.denoiser._block_swapper
    assert len(result.samples) == 2 and swapper.resident() == []
    assert all(not fake_device.on_device(p) for p in swapper.host)  # the swapped weights are their host copies
    assert all(fake_device.on_device(p) for p in result.parts.denoiser.parameters() if not swapper.swaps(p)), [
        (n, p.device) for n, p in result.parts.denoiser.named_parameters() if not fake_device.on_device(p)][:5]


def test_swapped_weights_optimizer_state_leaves_the_device(flux_config, gpu):
    """Defect 2: the swapped weights' optimizer state was compared with `fakegpu:0 == fakegpu` and never left
    the device (+2x the swapped weights with AdamW)."""
    result = train_db(flux_config(train={**CHECKPOINTED, "blocks_to_swap": 3}, optimizer=FUSED,
                             dreambooth={"train_text_encoder": False}))
    swapper = result.parts.denoiser._block_swapper
    trained = [p for k in swapper.swapped for p in swapper.weights[k] if p.requires_grad]
    states = [v for p in trained for v in _tensor_state(result.optimizer, p).values()]
    assert trained and states and not any(fake_device.on_device(v) for v in states)


def test_resume_full_fine_tune_with_block_swap(flux_config, tmp_path, gpu):
    """Defect 3: on resume the swapped weights' optimizer state was loaded on the host and never brought to the
    device: the first step mixed host and device tensors."""
    def run(**sections):
        base = {"train": {**CHECKPOINTED, "blocks_to_swap": 3, "max_train_steps": 4}, "optimizer": FUSED,
                "dreambooth": {"train_text_encoder": False}, "save": {"save_every_n_steps": 2, "save_state": True}}
        for name, values in sections.items():
            base[name] = {**base[name], **values} if name in base else values
        return train_db(flux_config(**base))

    whole = run(train={"output_name": "whole"})
    resumed = run(train={"output_name": "resumed"}, save={"resume": str(tmp_path / "out" / "whole-step00000002-state")})
    assert resumed.losses == whole.losses[2:]


def _nan_at(module, monkeypatch, calls_with_nan):
    real, calls = module.batch_loss, {"n": 0}

    def sometimes_nan(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] in calls_with_nan else loss

    monkeypatch.setattr(module, "batch_loss", sometimes_nan)


@pytest.mark.parametrize("bad_steps", [{0, 2}, {1, 2}])
def test_nan_loss_under_fp16_loss_scaling(bad_steps):
    """Defect 4: under fp16 loss scaling a skipped NaN step left the GradScaler unscaled-but-not-updated, so the
    next step's unscale_ raised; at step 0 (NaN first) the scaler had no scale yet. accelerate gives no scaler
    on the CPU: a CPU GradScaler is put where accelerate puts its CUDA one."""
    from accelerate import Accelerator

    from library.guards import NonFiniteGuard

    accelerator = Accelerator(cpu=True, mixed_precision="fp16")
    accelerator.native_amp, accelerator.scaler = True, torch.amp.GradScaler("cpu", init_scale=2.0**8)  # as on CUDA
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = accelerator.prepare(torch.optim.SGD(model.parameters(), lr=0.01))
    guard, said = NonFiniteGuard(3, say=lambda text: None), []
    for step in range(4):
        before = model.weight.detach().clone()
        loss = (model(torch.ones(2, 4)) - 3).pow(2).mean() * (float("nan") if step in bad_steps else 1.0)  # never 0
        if guard.loss_ok(loss):
            accelerator.backward(loss)
        if guard.step_ok(list(model.parameters()), 1.0, step, accelerator):
            optimizer.step()
            said.append(step)
        optimizer.zero_grad(set_to_none=True)
        assert torch.equal(model.weight, before) == (step in bad_steps)
    assert said == [s for s in range(4) if s not in bad_steps] and guard.skipped == len(bad_steps)


def test_t5_mask_with_cached_text_outputs(flux_config, gpu):
    """Defect 5: with apply_t5_attn_mask and cached text outputs the padding mask was built on the host while
    T5 ran on the device (brought over for its forward), and the two were multiplied."""
    result = train_network(flux_config(model={"apply_t5_attn_mask": True},
                               network={"network_train_unet_only": True},
                               train={"cache_text_encoder_outputs": True}))
    assert len(result.losses) == 4 and all(x == x for x in result.losses)


def test_report_denoising_loss_with_cached_text_outputs(make_config, gpu):
    """Defect 6: report_denoising_loss re-encoded the captions with the text encoders left on the host after
    caching (T5 on the CPU for minutes with SD3 / FLUX) and gave host hidden states to the device's U-Net."""
    result = train_network(make_config(network={"network_train_unet_only": True},
                               train={"cache_text_encoder_outputs": True},
                               logging={"report_denoising_loss": True}))
    assert result.base_loss > 0 and result.trained_loss > 0


def _int8_tensors(encoder):
    import bitsandbytes as bnb

    for layer in encoder.modules():
        if isinstance(layer, bnb.nn.Linear8bitLt):
            yield from (t for t in (layer.weight, layer.weight.CB, layer.weight.SCB, layer.state.CB, layer.state.SCB)
                        if t is not None)


def test_int8_t5_leaves_the_device_after_caching(flux_config, gpu):
    """Defect 7: bitsandbytes keeps int8 T5's weights in weight.CB / SCB and state.CB / SCB, which a parent's
    .to() never moves: after caching, T5 (~4.4 GiB at full size) stayed on the device for the whole run."""
    result = train_network(flux_config(model={"t5xxl_precision": "int8"}, network={"network_train_unet_only": True},
                               train={"cache_text_encoder_outputs": True}))
    t5 = result.parts.text_encoders["te3"]
    tensors = list(_int8_tensors(t5))
    assert tensors and not any(fake_device.on_device(t) for t in tensors)


def test_cached_text_outputs_stay_on_the_host(make_config, tiny_sd1, gpu):
    """Defect 8: every cached text-encoder output lived on the device for the whole run (~4 MiB per caption
    for FLUX); they stay on the host and each batch's share comes over."""
    from library.data.cache import cache_text_outputs
    from library.families import ModelSource, get_family

    family = get_family("auto", str(tiny_sd1[0]))
    parts = family.load(ModelSource(str(tiny_sd1[0])))
    for encoder in parts.text_encoders.values():
        encoder.to(gpu)
    before = fake_device.resident_bytes()
    cached = cache_text_outputs(family, parts, ["a red circle", "a blue square"], 1, None, lambda *a: None, gpu)
    assert not any(fake_device.on_device(v) for c in cached.values() for v in c.values())
    assert fake_device.resident_bytes() == before
    result = train_network(make_config(network={"network_train_unet_only": True}, train={"cache_text_encoder_outputs": True}))
    assert len(result.losses) == 4 and all(x == x for x in result.losses)


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_saving_a_transformer_builds_the_fused_tensors_on_the_host(name, tiny_flux, tiny_sd3, gpu):
    """Defect 11: saving a FLUX / SD3 full fine-tune built the single file's fused qkv tensors on the device
    (a second copy of every attention weight there, at the end of the run)."""
    from library.families import ModelSource, get_family

    folder = {"flux": tiny_flux, "sd3": tiny_sd3}[name]["folder"]
    family = get_family("auto", str(folder))
    parts = family.load(ModelSource(str(folder)))
    for module in [parts.denoiser, parts.vae, *parts.text_encoders.values()]:
        module.to(gpu)
    fake_device.reset_peak()
    before = fake_device.resident_bytes()
    state = family.single_file_state_dict(parts)
    assert fake_device.peak_bytes() == before
    assert not any(fake_device.on_device(v) for v in state.values())


@pytest.mark.parametrize("env", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_multi_gpu_engines_are_refused_up_front(make_config, monkeypatch, env):
    """Defect 16: an `accelerate config` with FSDP was ignored (the modules are never prepared) and one with
    DeepSpeed failed inside accelerate; what an engine cannot run is refused before anything loads, saying
    what to do (the whole matrix: tests/test_engines.py)."""
    from library.config import ConfigError

    monkeypatch.setenv(env, "true")
    with pytest.raises(ConfigError, match="accelerate config` again with plain multi-GPU"):
        train_network(make_config())


def test_xformers_on_flux_is_refused_up_front(flux_config):
    """Defect 16: xformers on FLUX.1 / SD3 was accepted and silently ignored (joint attention runs on SDPA)."""
    from library.config import ConfigError

    cfg = flux_config()
    cfg.train.xformers = True  # as a config with xformers installed reads (not installed here)
    with pytest.raises(ConfigError, match="xformers.*SDPA"):
        train_db(cfg)


@pytest.fixture
def fp32_precision():
    saved = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "ieee"
    yield
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved


def test_runs_use_tf32_on_cuda(make_config, fp32_precision):
    """GPU users' expectation: TF32 matmuls and convolutions (a default run did full-fp32 matmuls on Ampere+)."""
    train_network(make_config(train={"max_train_steps": 1}))
    assert torch.backends.cuda.matmul.fp32_precision == torch.backends.cudnn.conv.fp32_precision == "tf32"


def test_sampling_brings_the_parts_one_at_a_time(flux_config, tmp_path, gpu):
    """Defect 9: sampling brought the VAE, every text encoder and the denoiser to the device at once, on top of
    the training state. The parts kept on the host (cached latents and text outputs) visit one at a time; the
    denoiser stays where training keeps it."""
    from library.families import ModelSource, get_family
    from library.sampling import SampleSettings, SamplePrompt, render_samples

    cfg = flux_config()
    folder = cfg.model.pretrained_model_name_or_path
    family = get_family("auto", folder)
    parts = family.load(ModelSource(folder, t5xxl_max_token_length=16))
    parts.denoiser.to(gpu)  # as in training; the VAE and the text encoders stay on the host (cached outputs)
    others = {"vae": parts.vae, **parts.text_encoders}
    seen = []

    def record(name):
        def hook(module, args):  # noqa: ARG001
            seen.append((name, sorted(k for k, m in others.items() if fake_device.on_device(next(m.parameters())))))
        return hook

    for name, module in parts.text_encoders.items():  # the layers inside: they run once the encoder has arrived
        for layer in module.modules():
            if list(layer.parameters(recurse=False)):
                layer.register_forward_pre_hook(record(name))
    parts.vae.decoder.register_forward_pre_hook(record("vae"))
    settings = SampleSettings((SamplePrompt("a red circle", seed=3, steps=2),), 64, 64, 2, "euler", 3, 1)
    paths = render_samples(family, parts, settings, tmp_path, "s", gpu)
    assert len(paths) == 1 and {name for name, _ in seen} == set(others), seen
    assert all(resident == [name] for name, resident in seen), seen  # each ran alone on the device
    assert not any(fake_device.on_device(next(m.parameters())) for m in others.values())  # and went back
    assert all(fake_device.on_device(p) for p in parts.denoiser.parameters())


def test_class_images_in_the_runs_precision_one_module_at_a_time(make_config, tmp_path, monkeypatch, gpu):
    """Defect 10: class images for prior preservation were generated in fp32 without autocast with the
    denoiser, the VAE and the text encoders on the device at once."""
    import library.prior
    import train_db

    real, seen = library.prior.ensure_class_images, []  # train() imports it when it starts: patched there

    def watched(family, parts, *args, **kwargs):
        others = {"vae": parts.vae, **parts.text_encoders}

        def record(name):
            def hook(module, args):  # noqa: ARG001
                resident = sorted(k for k, m in others.items() if fake_device.on_device(next(m.parameters())))
                seen.append((name, resident, torch.is_autocast_enabled(fake_device.NAME)))
            return hook

        handles = [layer.register_forward_pre_hook(record(name)) for name, module in parts.text_encoders.items()
                   for layer in module.modules() if list(layer.parameters(recurse=False))]
        handles += [parts.vae.decoder.register_forward_pre_hook(record("vae")),
                    parts.denoiser.conv_in.register_forward_pre_hook(record("denoiser"))]
        try:
            return real(family, parts, *args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()

    monkeypatch.setattr(library.prior, "ensure_class_images", watched)
    result = train_db.train(make_config(train={"mixed_precision": "bf16", "max_train_steps": 2},
                                        dreambooth={"class_data_dir": str(tmp_path / "class"),
                                                    "class_prompt": "a photo of a circle", "num_class_images": 2},
                                        sample={"sample_steps": 2}))
    assert len(result.losses) == 2 and len(list((tmp_path / "class").glob("*.png"))) == 2
    assert {name for name, _, _ in seen} == {"te", "vae", "denoiser"}
    events = [(n, tuple(r)) for n, r, _ in seen]
    events = [e for k, e in enumerate(events) if k == 0 or e != events[k - 1]]  # one per change
    assert all(resident == (() if name == "denoiser" else (name,)) for name, resident in events), events
    assert all(autocast for _, _, autocast in seen)  # the run's precision (bf16 autocast)


class _FakeCudaRng:
    """torch.cuda's RNG functions on a machine with `count` visible GPUs (this process on `current`): as CUDA's
    own, setting the state of a device index that is not visible raises IndexError."""

    def __init__(self, monkeypatch, count: int, current: int = 0):
        self.count, self.current, self.set = count, current, {}
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [self.get(i) for i in range(count)])
        for module in (torch.cuda, torch.cuda.random):  # set_rng_state_all calls the module's own
            monkeypatch.setattr(module, "set_rng_state", self.put)

    @staticmethod
    def get(device=0) -> torch.Tensor:
        return torch.full((4,), 10 + (device if isinstance(device, int) else 0), dtype=torch.uint8)

    def put(self, state, device=0) -> None:
        if device >= self.count:
            raise IndexError(f"device {device} of {self.count}")
        self.set[device] = int(state[0])


@pytest.mark.parametrize("saved_gpus, gpus, rank", [(2, 1, 0), (4, 2, 1), (1, 2, 1)])
def test_resume_on_a_machine_with_fewer_gpus(monkeypatch, saved_gpus, gpus, rank):
    """Defect 12: the state held every GPU's RNG of the machine that saved it and a resume set them all: on a
    machine with fewer visible GPUs, IndexError. Each process now restores its own device's RNG only."""
    from library import checkpoint

    _FakeCudaRng(monkeypatch, saved_gpus, current=0)
    saved = checkpoint._rng_state()
    old_format = {**saved, "cuda": torch.cuda.get_rng_state_all()}  # what states written before hold
    for state in (saved, old_format):
        machine = _FakeCudaRng(monkeypatch, gpus, current=rank)
        checkpoint._set_rng_state(state)
        expected = 10 + (rank if len(state["cuda"]) > rank else 0)
        assert machine.set == {rank: expected if state is old_format else 10}


@pytest.mark.parametrize("train, key", [({"mixed_precision": "bf16"}, "mixed_precision"),
                                        ({"mixed_precision": "bf16", "full_bf16": True}, "full_bf16")])
def test_bf16_on_a_gpu_without_bf16_is_refused_up_front(make_config, monkeypatch, train, key):
    """Defect 16: bf16 on a GPU without it (T4, V100) was accepted and failed or crawled (emulated) after
    loading; it is refused before anything loads, naming the key and what to use instead."""
    from library.config import ConfigError
    from library.run import refuse_unsupported

    cfg = make_config(train=train)
    supported = {"bf16": True}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: supported["bf16"])
    refuse_unsupported(cfg, "network")  # an Ampere card: nothing to say
    supported["bf16"] = False
    with pytest.raises(ConfigError, match=rf"'train.{key}': this GPU \(Tesla T4\) has no bf16; use .*fp16"):
        train_network(cfg)
    refuse_unsupported(make_config(train={"mixed_precision": "fp16"}), "network")  # fp16 is what such a card runs


def _syncs_per_step(monkeypatch, run):
    """(value reads, copies to host) of the device between one step's batch_loss and the next's, per step."""
    import library.training

    real, marks = library.training.batch_loss, []

    def counted(*args, **kwargs):
        marks.append((fake_device.value_reads(), fake_device.copies_to_host()))
        return real(*args, **kwargs)

    monkeypatch.setattr(library.training, "batch_loss", counted)  # train() imports it when it starts
    result = run()
    return result, [(r - r0, c - c0) for (r0, c0), (r, c) in zip(marks, marks[1:])]


def test_host_syncs_only_at_the_logging_cadence(make_config, monkeypatch, gpu):
    """Defect 15: every step read the loss before backward (loss_ok), the gradient norm (float(norm)) and the
    loss again (.item()), and scale_weight_norms read two values per adapted layer: each a sync. Now a step
    reads one value (the NaN guard's: losses and gradient norm finite, together), and the losses and norms are
    copied to the host in one copy every log_every_n_steps."""
    result, per_step = _syncs_per_step(monkeypatch, lambda: train_network(make_config(
        train={"max_train_steps": 8}, logging={"log_every_n_steps": 4}, network={"scale_weight_norms": 1.0})))
    assert per_step == [(1, 0), (1, 0), (1, 0), (1, 1), (1, 0), (1, 0), (1, 0)], per_step  # after step 4: a read
    assert len(result.losses) == len(result.keys_scaled) == 8 and all(x == x for x in result.losses)


def test_fused_backward_pass_reads_nothing_per_parameter(make_config, monkeypatch, gpu):
    """Defect 14: the fused backward pass read each parameter's gradient check (bool(isfinite(...))): a sync
    per parameter, hundreds a step. Now two reads a step: the loss before backward, and the step's check."""
    result, per_step = _syncs_per_step(monkeypatch, lambda: train_db(make_config(
        optimizer=FUSED, train={"max_train_steps": 3}, logging={"log_every_n_steps": 4},
        dreambooth={"train_text_encoder": False})))
    assert per_step == [(2, 0), (2, 0)], per_step
    assert len(result.losses) == 3 and all(x == x for x in result.losses)


@pytest.mark.parametrize("on_device", [False, True])
def test_ema_copies_batched_or_kept_on_the_device(make_config, monkeypatch, gpu, on_device):
    """Defect 13: the EMA copied every trained weight from the device to the host, synchronously, at every
    step. ema_update_every = N updates it every N steps (decay ** N); ema_on_device keeps it on the device,
    where an update copies nothing to the host."""
    import torch.optim.swa_utils as swa

    real, decays = swa.get_ema_multi_avg_fn, []
    monkeypatch.setattr(swa, "get_ema_multi_avg_fn", lambda decay: decays.append(decay) or real(decay))
    result, per_step = _syncs_per_step(monkeypatch, lambda: train_db(make_config(
        train={"max_train_steps": 4}, logging={"log_every_n_steps": 8}, dreambooth={
            "train_text_encoder": False, "use_ema": True, "ema_decay": 0.9, "ema_update_every": 2,
            "ema_on_device": on_device})))
    weights = len(list(result.parts.denoiser.parameters()))
    assert [copies for _, copies in per_step] == [0, 0 if on_device else weights, 0]  # step 2's update only
    assert int(result.ema.n_averaged) == 2
    assert all(fake_device.on_device(p) == on_device for p in result.ema.module.parameters())
    assert decays == [pytest.approx(0.9 ** 2)]  # the same averaging time as 0.9 at every step


def test_swapped_weights_live_in_few_host_slabs(flux_config, monkeypatch, gpu):
    """Defect 14: each swapped weight had a pinned host allocation of its own, which PyTorch's pinned allocator
    rounds up to a power of two (~1.56x the weights for FLUX); now they are views into slabs whose size is a
    power of two already, and the run reports the host RAM they hold."""
    from library.memory import HostSlabs

    monkeypatch.setattr(HostSlabs, "SLAB", 2**20)
    slabs = HostSlabs(pin=True)  # pinned on CUDA; plain host memory here, the same arithmetic
    tensors = [torch.randn(76800) for _ in range(5)]  # 300 KiB each: a power of two each would be 512 KiB
    copies = [slabs.copy(t) for t in tensors]
    assert all(torch.equal(a, b) for a, b in zip(tensors, copies))
    assert slabs.host_bytes() == 2 * 2**20 < 5 * 2**19  # three to a slab: 2 MiB, not 2.5 MiB
    assert len({c.untyped_storage().data_ptr() for c in copies}) == 2
    assert slabs.take((3, 2**19), torch.float16).shape == (3, 2**19) and slabs.host_bytes() == 2 * 2**20 + 2**22

    result = train_db(flux_config(train={**CHECKPOINTED, "blocks_to_swap": 3}, optimizer=FUSED,
                             dreambooth={"train_text_encoder": False}))
    swapper = result.parts.denoiser._block_swapper
    storages = {t.untyped_storage().data_ptr() for t in [*swapper.host.values(), *swapper.state_host.values()]}
    assert len(storages) <= len(swapper.slabs.buffers) <= 4 and swapper.host_ram() == swapper.slabs.host_bytes()
    assert swapper.host_ram() < 2 * (swapper.bytes_swapped() + sum(
        t.numel() * t.element_size() for t in swapper.state_host.values()))


def test_loader_pins_batches_for_a_gpu(make_config, monkeypatch):
    """Defect 15: the DataLoader did not pin its batches, so every batch's copy to a GPU went through pageable
    memory (a staging copy, synchronous). With CUDA it pins them; the CPU-only machine does not."""
    from library.training import make_loader, prepare_data

    cfg = make_config()
    plan, dataset, *_ = prepare_data(cfg, lambda *a: None)
    assert make_loader(cfg, plan, dataset)[0].pin_memory is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert make_loader(cfg, plan, dataset)[0].pin_memory is True


def _blocking_copies_per_step(monkeypatch, run):
    """Blocking copies device -> host between one step's batch_loss and the next's, per step."""
    import library.training

    real, marks = library.training.batch_loss, []

    def counted(*args, **kwargs):
        marks.append(fake_device.blocking_copies_to_host())
        return real(*args, **kwargs)

    monkeypatch.setattr(library.training, "batch_loss", counted)
    result = run()
    return result, [b - a for a, b in zip(marks, marks[1:])]


def _swapped_db_run(flux_config, monkeypatch, stream: bool):
    """Three steps of a full fine-tune with 3 blocks swapped, with EMA: (the result, the blocking copies device -> host
    per step, the events recorded after each block's write-back, by id)."""
    import library.block_swap

    written = []
    with monkeypatch.context() as patch:
        if stream:
            real_write_back = library.block_swap.BlockSwapper._write_back

            def write_back(self, k, params):
                real_write_back(self, k, params)
                written.append(self.writing[k].event_id)

            patch.setattr(library.block_swap.BlockSwapper, "_write_back", write_back)
        else:
            patch.setattr(library.block_swap, "side_stream", lambda device: None)
        result, per_step = _blocking_copies_per_step(patch, lambda: train_db(flux_config(
            train={**CHECKPOINTED, "blocks_to_swap": 3, "max_train_steps": 3, "output_name": f"db-{stream}"},
            optimizer=FUSED, dreambooth={"train_text_encoder": False, "use_ema": True, "ema_decay": 0.5,
                                         "ema_on_device": True},
            logging={"log_every_n_steps": 8})))
    return result, per_step, written


def test_block_swap_writes_back_without_the_host_waiting(flux_config, monkeypatch, gpu):
    """Defect 14: the block-swap write-back (each trained swapped weight and its AdamW moments, device -> host)
    was a blocking copy per tensor: 3 per weight, every step. Now it runs on the swapper's side stream without
    the host waiting (0 blocking copies a step), one event recorded after each block's copies; the block's next
    load waits for it on the device and every host reader (the EMA update, checkpoints, the saved files,
    remove) through settle_all(). The test device defers those copies until an event after them is waited for,
    so a reader that did not wait would read stale weights: the losses, the weights, the EMA weights and the
    saved file equal those of the synchronous write-back (no side stream, as on the CPU)."""
    from safetensors.torch import load_file

    result, per_step, written = _swapped_db_run(flux_config, monkeypatch, stream=True)
    plain, plain_per_step, _ = _swapped_db_run(flux_config, monkeypatch, stream=False)
    swapper = result.parts.denoiser._block_swapper
    trained = {name: p for name, p in result.parts.denoiser.named_parameters() if swapper.swaps(p) and p.requires_grad}
    assert trained and per_step == [0, 0] and plain_per_step == [3 * len(trained)] * 2, (per_step, plain_per_step)
    assert len(written) == 3 * len(swapper.swapped) and set(written) <= set(fake_device.waited_events())
    assert fake_device.deferred_copies() == 0
    assert all(p.data_ptr() == swapper.host[p].data_ptr() for p in trained.values())  # on the host, written back
    assert result.losses == plain.losses
    plain_weights = dict(plain.parts.denoiser.named_parameters())
    assert all(torch.equal(p, plain_weights[name]) for name, p in trained.items())
    plain_ema = dict(plain.ema.module.named_parameters())
    assert all(torch.equal(p, plain_ema[name]) for name, p in result.ema.module.named_parameters())
    a, b = load_file(result.model_path), load_file(plain.model_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
