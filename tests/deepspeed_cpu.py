"""train_db.py under DeepSpeed on CPU processes, for tests only: started by torch.distributed.run with
ACCELERATE_USE_DEEPSPEED (what `accelerate launch --use_deepspeed` sets). accelerate 1.15 sets up DeepSpeed
only for a GPU-like backend (state.py: without one _prepare_backend gives DistributedType.NO and the processes
never meet); DeepSpeed itself runs ZeRO on its CPU accelerator over gloo, so here the processes are given gloo
where accelerate found no GPU."""
import sys

import accelerate.state
from accelerate.utils import DistributedType

_found_backend = accelerate.state.PartialState._prepare_backend


def _gloo_without_a_gpu(self, cpu=False, sagemaker_dp=False, backend=None):
    backend, distributed_type = _found_backend(self, cpu, sagemaker_dp, backend)
    if distributed_type == DistributedType.NO:
        return "gloo", DistributedType.MULTI_CPU
    return backend, distributed_type


accelerate.state.PartialState._prepare_backend = _gloo_without_a_gpu

if __name__ == "__main__":
    import train_db

    sys.exit(train_db.main(sys.argv[1:]))
