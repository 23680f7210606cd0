"""The EMA of sharded weights (FSDP2, `dreambooth.use_ema`): each process averages its own shard of every
trained weight, as torch's AveragedModel averages the whole weights on one GPU (the first update copies them,
each later one is `shard.lerp_(weight, 1 - decay)`), so no process ever holds a whole copy while training.

The averaged model's weights file is gathered on the main process (`averaged_copy`, every process taking part,
one tensor at a time); in a resumable state each process writes its shards through torch.distributed.checkpoint
beside accelerate's (`ema/` in the state's `sharded/` folder), so a state resumes with any number of processes
as the weights and optimizer state do."""
from __future__ import annotations

import torch

FOLDER = "ema"  # in accelerator.save_state's folder


class ShardedEMA:
    """The EMA of `module`'s parameters (DTensors, after fully_shard): this process' shards, on the CPU, or on
    the device with `on_device`. Updated, saved and loaded like train_db's AveragedModel."""

    def __init__(self, module: torch.nn.Module, decay: float, on_device: bool):
        self.decay, self.n_averaged = decay, 0
        self.params = dict(module.named_parameters())
        self.shards = {name: _local(p).detach().to(_local(p).device if on_device else "cpu", copy=True)
                       for name, p in self.params.items()}

    @torch.no_grad()
    def update_parameters(self, module: torch.nn.Module) -> None:
        """One EMA step of this process' shards (module: the sharded model whose parameters were given)."""
        shards = list(self.shards.values())
        current = [_local(self.params[name]).detach().to(shard.device) for name, shard in self.shards.items()]
        if self.n_averaged == 0:
            torch._foreach_copy_(shards, current)
        else:
            torch._foreach_lerp_(shards, current, 1.0 - self.decay)
        self.n_averaged += 1

    def averaged_copy(self, accelerator, module: torch.nn.Module):
        """An unsharded copy of `module` holding the averaged weights (and the module's buffers) on the main
        process' CPU; None on the others. Every process calls this (each tensor is all-gathered)."""
        from library.engines import gathered, unsharded_copy

        state = module.state_dict()
        state.update(self._dtensors())
        whole = gathered(accelerator, state)
        return None if whole is None else unsharded_copy(module, whole)

    def state_dict(self) -> dict:
        """What rides in state.pt (the shards are written apart, by `save`)."""
        return {"n_averaged": self.n_averaged, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.n_averaged = int(state["n_averaged"])

    def save(self, folder) -> None:
        """This process' shards into `folder`/ema (every process calls this: a collective)."""
        import torch.distributed.checkpoint as dcp

        dcp.save({"ema": self._dtensors()}, checkpoint_id=str(folder / FOLDER))

    def load(self, folder) -> None:
        """This process' shards from `folder`/ema, resharded when the state was saved by another number of
        processes."""
        import torch.distributed.checkpoint as dcp

        tensors = self._dtensors()
        dcp.load({"ema": tensors}, checkpoint_id=str(folder / FOLDER))
        with torch.no_grad():
            for name, shard in self.shards.items():
                shard.copy_(_local(tensors[name]))  # the DTensor may have copied a CPU shard to the device

    def with_states_of(self, accelerator) -> "ShardedEMA":
        """The shards saved and loaded with each accelerator.save_state / load_state (its hooks run on every
        process, with the state's folder)."""
        from pathlib import Path

        accelerator.register_save_state_pre_hook(lambda models, weights, folder: self.save(Path(folder)))
        accelerator.register_load_state_pre_hook(lambda models, folder: self.load(Path(folder)))
        return self

    def _dtensors(self) -> dict:
        """The shards as the DTensors they are shards of (same mesh, placements and global shape)."""
        from torch.distributed.tensor import DTensor

        return {name: DTensor.from_local(shard, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                         stride=p.stride())
                for (name, shard), p in zip(self.shards.items(), self.params.values())}


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process' shard of a DTensor (a plain tensor is whole on every process)."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
