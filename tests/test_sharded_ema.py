"""library/sharded_ema.py in one process (a gloo group of 1, fully_shard on the CPU): the EMA of the shards
follows torch's AveragedModel of the whole weights update for update, gathers to its weights, and its shards
come back from a state's folder (torch.distributed.checkpoint)."""
import types

import pytest
import torch


@pytest.fixture
def one_process_group(monkeypatch):
    import torch.distributed as dist

    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29581", "RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    dist.init_process_group("gloo")
    yield
    dist.destroy_process_group()


def test_the_shards_average_as_averaged_model_and_come_back_from_a_state(one_process_group, tmp_path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from library.engines import gathered
    from library.sharded_ema import ShardedEMA

    torch.manual_seed(0)
    whole = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 3))
    sharded = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 3))
    sharded.load_state_dict(whole.state_dict())
    mesh = init_device_mesh("cpu", (1,))  # not the default: the accelerator, fakegpu once a test has loaded it
    fully_shard(sharded[0], mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    averaged = AveragedModel(whole, multi_avg_fn=get_ema_multi_avg_fn(0.7))
    ema = ShardedEMA(sharded, 0.7, on_device=False)
    for step in range(3):  # the weights move, then both EMAs update (the first copies, as AveragedModel's)
        torch.manual_seed(step)
        moves = [torch.randn_like(p) for p in whole.parameters()]
        with torch.no_grad():
            for m, p, q in zip(moves, whole.parameters(), sharded.parameters()):
                p.add_(m)
                q.add_(torch.distributed.tensor.distribute_tensor(m, q.device_mesh, q.placements))
        averaged.update_parameters(whole)
        ema.update_parameters(sharded)
    main = types.SimpleNamespace(is_main_process=True)
    expected = dict(averaged.module.named_parameters())
    got = gathered(main, ema._dtensors())
    assert got.keys() == expected.keys() and ema.n_averaged == 3
    worst = max((got[k] - expected[k]).abs().max().item() for k in got)
    assert worst < 1e-6, worst
    weights = gathered(main, sharded.state_dict())
    assert max((got[k] - weights[k]).abs().max().item() for k in got) > 0.1  # an average, not the weights

    ema.save(tmp_path)
    again = ShardedEMA(sharded, 0.7, on_device=False)
    again.load(tmp_path)
    again.load_state_dict(ema.state_dict())
    assert again.n_averaged == 3 and all(torch.equal(again.shards[k], ema.shards[k]) for k in ema.shards)
