"""fp8_base, blocks_to_swap and cpu_offload_checkpointing on the tiny FLUX.1: the same losses (exactly) with
and without swapping / offloading, the swapper's residency, fp8 storage of the frozen base only, config errors."""
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from conftest import train_db, train_network
from library import memory
from library.block_swap import BlockSwapper
from library.config import ConfigError

CHECKPOINTED = {"gradient_checkpointing": True}
# Swapping blocks and offloading checkpoints move tensors, never change them: a move is a bitwise copy. But the
# two runs need not order their float operations the same way: the recomputed forward in backward runs on
# freshly copied (differently laid out) storages, and the CPU kernels pick their blocking from the layout and
# the thread count, so a few last-bit differences appear on some machines (6e-8 on the losses, seen on a fresh
# 2-core machine). A real placement fault (a stale weight, a wrong activation restored, a skipped update) moves
# the losses of these tiny runs by 1e-3 or more, so 1e-6 relative still fails on every such fault.
SAME = {"rel": 1e-6, "abs": 1e-9}


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-7) for k in a)

AGAIN = {"overwrite": True}  # the second run writes to the same output_dir
FUSED = {"optimizer_type": "Adafactor", "fused_backward_pass": True, "learning_rate": 1e-4, "max_grad_norm": 0.0}


def _denoiser_state(parts):
    return {k: v.detach().to("cpu", copy=True) for k, v in parts.denoiser.state_dict().items()}


def test_lora_block_swap_gives_identical_losses_and_adapter(flux_config):
    plain = train_network(flux_config(train=CHECKPOINTED))
    swapped = train_network(flux_config(train={**CHECKPOINTED, "blocks_to_swap": 4}, save=AGAIN))  # all 2 double + 2 single blocks
    assert swapped.losses == pytest.approx(plain.losses, **SAME)
    a = {k: p for c in plain.adapted for k, p in c.module.named_parameters() if p.requires_grad}
    b = {k: p for c in swapped.adapted for k, p in c.module.named_parameters() if p.requires_grad}
    assert _same_tensors(a, b)
    swapper = swapped.parts.denoiser._block_swapper
    # 4 steps x (4 blocks forward + 4 re-run in backward), the final sample-free run: nothing else
    assert swapper.loads == 4 * 8
    assert swapper.most_resident == 2 and swapper.resident() == []
    for k in swapper.swapped:  # between steps every swapped frozen weight is its host copy; adapters are not swapped
        for p in swapper.weights[k]:
            assert not p.requires_grad and p.data.data_ptr() == swapper.host[p].data_ptr()
    assert all(not swapper.swaps(p) for c in swapped.adapted for p in c.parameters())


def test_full_fine_tune_block_swap_steps_on_the_device_and_matches(flux_config):
    plain = train_db(flux_config(train=CHECKPOINTED, optimizer=FUSED, dreambooth={"train_text_encoder": False}))
    swapped = train_db(flux_config(train={**CHECKPOINTED, "blocks_to_swap": 3}, optimizer=FUSED,
                              dreambooth={"train_text_encoder": False}, save=AGAIN))
    assert swapped.losses == pytest.approx(plain.losses, **SAME)
    a, b = _denoiser_state(plain.parts), _denoiser_state(swapped.parts)
    assert _same_tensors(a, b)
    swapper = swapped.parts.denoiser._block_swapper
    assert len(swapper.swapped) == 3 and swapper.resident() == []
    trained = [p for k in swapper.swapped for p in swapper.weights[k]]
    assert trained and all(p.requires_grad for p in trained)
    for p in trained:  # the updated weight and its Adafactor state are back in their host buffers
        assert p.data.data_ptr() == swapper.host[p].data_ptr()
        state = swapped.optimizer.state_of(p)
        assert state["step"] == 4
        keys = [key for key, v in state.items() if isinstance(v, torch.Tensor) and v.dim() > 0]
        assert keys and all(state[key] is swapper.state_host[(id(p), key)] for key in keys)
    assert _moved(swapped, trained)  # the swapped weights were trained


def _moved(result, trained):
    from library.families.flux import FluxFamily
    from library.families.base import ModelSource

    start = FluxFamily().load(ModelSource(result.parts.source.path)).denoiser
    names = {id(p): n for n, p in result.parts.denoiser.named_parameters()}
    initial = dict(start.named_parameters())
    return all(not torch.equal(p.data.float(), initial[names[id(p)]].float()) for p in trained if p.dim() == 2)


def test_cpu_offload_checkpointing_gives_identical_losses(flux_config):
    plain = train_network(flux_config(train=CHECKPOINTED))
    offloaded = []
    memory.OFFLOAD_OBSERVERS.append(lambda t, where: offloaded.append(t.nbytes) if where == "host" else None)
    try:
        result = train_network(flux_config(train={**CHECKPOINTED, "cpu_offload_checkpointing": True}, save=AGAIN))
    finally:
        memory.OFFLOAD_OBSERVERS.pop()
    assert result.losses == pytest.approx(plain.losses, **SAME)
    assert len(offloaded) > 4 * 4  # at least every checkpointed block's input, every step


def test_offloaded_checkpoints_leave_on_a_side_stream_on_the_test_device(gpu):
    """cpu_offload_checkpointing on an accelerator (the test device): every saved tensor goes to the host on
    library/streams.py's side stream, the host waiting for none of the copies; backward's compute stream waits
    for each copy's event before copying it back, and the gradients are those of the model without offloading."""
    import fake_device

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 1)).to(gpu)
    x = torch.randn(4, 8).to(gpu)
    model(x).sum().backward()
    plain = [p.grad for p in model.parameters()]
    model.zero_grad()
    memory.offload_checkpoints(model)
    blocking, host_waits, events = (fake_device.blocking_copies_to_host(), fake_device.host_waits(),
                                    len(fake_device.waited_events()))
    loss = model(x).sum()
    assert fake_device.deferred_copies() >= 1  # the last copy still "running" on the side stream
    loss.backward()
    assert fake_device.deferred_copies() == 0 and len(fake_device.waited_events()) - events >= 4
    assert fake_device.blocking_copies_to_host() == blocking and fake_device.host_waits() == host_waits
    assert all(torch.equal(p.grad.cpu(), g.cpu()) for p, g in zip(model.parameters(), plain))


def test_fp8_base_stores_the_frozen_base_only(flux_config):
    bf16 = {"mixed_precision": "bf16", **CHECKPOINTED}
    plain = train_network(flux_config(train=bf16))
    result = train_network(flux_config(train={**bf16, "fp8_base": True}, save=AGAIN))
    denoiser = result.parts.denoiser
    layer = denoiser.transformer_blocks[0].attn.to_q
    assert layer.base_layer.weight.dtype == torch.float8_e4m3fn
    assert layer.lora_A["default"].weight.dtype == torch.float32 and layer.lora_A["default"].weight.requires_grad
    assert denoiser.x_embedder.weight.dtype == torch.float8_e4m3fn  # outside adapters too
    assert denoiser.transformer_blocks[0].attn.norm_q.weight.dtype == torch.bfloat16  # not a Linear: kept
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert result.losses != plain.losses and result.losses == pytest.approx(plain.losses, rel=0.05)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x):
        return torch.tanh(self.linear(x))


def test_swapper_keeps_at_most_two_swapped_blocks_resident():
    torch.manual_seed(0)
    blocks = [_Block() for _ in range(6)]
    reference = [_Block() for _ in range(6)]
    for a, b in zip(blocks, reference):
        b.load_state_dict(a.state_dict())
    for b in blocks + reference:
        b.requires_grad_(False)
    swapper = BlockSwapper(blocks, 4, "cpu")
    assert swapper.swapped == [0, 2, 3, 5]  # spread over the six
    seen = []

    def watch(module, args):  # noqa: ARG001
        seen.append(len(swapper.resident()))
        # swapped blocks whose weights are not their host copies: on the "device"
        seen.append(sum(any(p.data.data_ptr() != swapper.host[p].data_ptr() for p in swapper.weights[k])
                        for k in swapper.swapped))

    for b in blocks:
        b.linear.register_forward_pre_hook(watch)
    x = torch.randn(3, 8, requires_grad=True)
    y = x
    for b in blocks:
        y = checkpoint(b, y, use_reentrant=False)
    y.sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    y2 = x2
    for b in reference:
        y2 = b(y2)
    y2.sum().backward()
    assert torch.equal(y, y2) and torch.equal(x.grad, x2.grad)
    assert max(seen) == 2 and swapper.most_resident == 2
    assert swapper.loads == 8 and swapper.resident() == []  # 4 swapped blocks, forward and backward's re-run


def test_config_errors(make_config):
    with pytest.raises(ConfigError, match="blocks_to_swap.*gradient_checkpointing"):
        make_config(train={"blocks_to_swap": 4})
    with pytest.raises(ConfigError, match="fp8_base.*mixed_precision"):
        make_config(train={"fp8_base": True})
    with pytest.raises(ConfigError, match="cpu_offload_checkpointing"):
        make_config(train={"cpu_offload_checkpointing": True})
    from library.config_checks import check_recipe

    cfg = make_config(train={"fp8_base": True, "mixed_precision": "bf16"})
    with pytest.raises(ConfigError, match="fp8_base.*train_db"):
        check_recipe(cfg, "db")
    cfg = make_config(train={"blocks_to_swap": 4, "gradient_checkpointing": True})
    with pytest.raises(ConfigError, match="fused_backward_pass"):
        check_recipe(cfg, "db")
    check_recipe(cfg, "network")


def test_block_swap_with_offloaded_checkpoints_and_cached_text_gives_identical_losses(flux_config):
    """All placement switches at once change nothing but placement; so does caching the text outputs
    (encoded in a batch, the encoders visiting the device one at a time)."""
    frozen = {"network_train_unet_only": True}
    plain = train_network(flux_config(train=CHECKPOINTED, network=frozen))
    placed = train_network(flux_config(train={**CHECKPOINTED, "blocks_to_swap": 3, "cpu_offload_checkpointing": True,
                                      "cache_text_encoder_outputs": True}, network=frozen, save=AGAIN))
    assert placed.losses == pytest.approx(plain.losses, **SAME)
    assert placed.parts.denoiser._block_swapper.resident() == []
