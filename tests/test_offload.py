"""library.offload.OneAtATime: modules visit the device one at a time, told to the planner's observers."""
import torch
from torch import nn

from library.memory import OFFLOAD_OBSERVERS
from library.offload import OneAtATime


def test_one_module_on_the_device_at_a_time():
    a, b = nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    owner = {id(t): name for name, m in (("a", a), ("b", b)) for t in m.parameters()}
    resident, most = set(), 0

    def observe(tensor, where):
        nonlocal most
        (resident.discard if where == "host" else resident.add)(owner[id(tensor)])
        most = max(most, len(resident))

    OFFLOAD_OBSERVERS.append(observe)
    try:
        x = torch.randn(2, 4)
        expected = b(a(x)), a(x)
        with OneAtATime([a, b], "cpu"):
            got = b(a(x)), a(x)  # a, then b (a leaves), then a again (b leaves)
            assert resident == {"a"}
        assert resident == set() and most == 1
    finally:
        OFFLOAD_OBSERVERS.remove(observe)
    assert all(torch.equal(g, e) for g, e in zip(got, expected))
    assert not a._forward_pre_hooks and not b._forward_pre_hooks  # hooks gone after the block
