"""Process group and FSDP2 sharding.

`torchrun --nproc_per_node N -m mixpo train ...` (or multi-node through torchrun's rendezvous)
sets RANK / WORLD_SIZE / LOCAL_RANK; we then start NCCL on GPUs or gloo on CPU and shard the
model with FSDP2 (`fully_shard`): one group per decoder layer plus the root (embeddings, final
norm, LM head). A plain `python -m mixpo train` is one process with no process group at all.
"""
from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistributedEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: object = None  # a 1-D DeviceMesh when world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(preference: str) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(preference)


def setup(device_preference: str = "auto", timeout_seconds: int = 1800) -> DistributedEnv:
    """Join the process group torchrun describes (if any) and pick this process's device. A
    collective that waits longer than `timeout_seconds` for a stuck (or stopped) rank raises
    instead of hanging forever."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size == 1:
        return DistributedEnv(0, 1, 0, device)
    if not dist.is_initialized():
        import datetime

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_seconds))
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world_size,))
    return DistributedEnv(rank, world_size, local_rank, device, mesh)


def shard(module: torch.nn.Module, decoder_layers, env: DistributedEnv,
          compute_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """FSDP2: each decoder layer is its own unit, the rest (embeddings, norm, LM head) belongs
    to the root unit `module`, whose forward therefore sees the head weight unsharded.
    `compute_dtype` (mixed precision): the sharded fp32 parameters are gathered in that
    dtype for the forward and backward."""
    if not env.distributed:
        return module
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # Reduce gradients in fp32 even when the parameters are bf16.
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for layer in decoder_layers:
        fully_shard(layer, mesh=env.mesh, mp_policy=policy)
    fully_shard(module, mesh=env.mesh, mp_policy=policy)
    return module


def barrier(env: DistributedEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_gather_cat(tensor: torch.Tensor, env: DistributedEnv) -> torch.Tensor:
    """Concatenate tensors from every rank along dim 0 (rank order); their first dimensions
    may differ (a last, incomplete batch shared unevenly)."""
    if not env.distributed:
        return tensor
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.empty_like(size) for _ in range(env.world_size)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    longest = max(sizes)
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[:tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(env.world_size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def all_reduce_min(value: int, env: DistributedEnv) -> int:
    """The smallest of every rank's `value`."""
    if not env.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=env.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def all_true(flag: bool, env: DistributedEnv) -> bool:
    """Whether `flag` holds on every rank."""
    if not env.distributed:
        return flag
    tensor = torch.tensor([0.0 if flag else 1.0], dtype=torch.float64, device=env.device)
    dist.all_reduce(tensor)
    return tensor.item() == 0


def all_reduce_sum(value: float, env: DistributedEnv) -> float:
    if not env.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=env.device)
    dist.all_reduce(tensor)
    return tensor.item()


def all_gather_objects(obj, env: DistributedEnv) -> list:
    if not env.distributed:
        return [obj]
    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj, env: DistributedEnv):
    """rank 0's `obj` on every rank."""
    if not env.distributed:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def teardown(env: DistributedEnv, clean: bool = True) -> None:
    """Leave the process group: on a clean exit every rank reaches the barrier before any
    destroys it (a rank tearing down while its peer still sends aborts the peer); after an
    error no barrier (the peer may be the stuck one), just the destroy."""
    if env.distributed and dist.is_initialized():
        try:
            if clean:
                dist.barrier()
        finally:
            dist.destroy_process_group()


class CollectiveTimeout(TimeoutError):
    """A collective waited longer than ddp_timeout for another rank."""


# gloo: "Timed out waiting ...", "Application timeout caused pair closure"; NCCL's watchdog:
# "... collective operation timeout".
_TIMEOUT_MESSAGE = re.compile(r"timed out|timeout", re.IGNORECASE)


@contextlib.contextmanager
def process_group(device_preference: str = "auto", timeout_seconds: int = 1800):
    """`setup`, then `teardown` on the way out. Under torchrun, a collective that times out
    (a stopped, stuck or dead peer) becomes a CollectiveTimeout naming the rank and the
    timeout, instead of a backend traceback; the process group is then left without a
    barrier, so the error surfaces at once."""
    env = setup(device_preference, timeout_seconds)
    try:
        yield env
    except RuntimeError as error:
        teardown(env, clean=False)
        if env.distributed and _TIMEOUT_MESSAGE.search(str(error)):
            raise CollectiveTimeout(
                f"rank {env.rank}: a collective waited longer than ddp_timeout = "
                f"{timeout_seconds} s for another rank (stopped, stuck or dead): "
                f"{str(error).splitlines()[0]}") from error
        raise
    except BaseException:
        teardown(env, clean=False)
        raise
    teardown(env)
