"""Process group setup the torchrun way: one process per device, gloo on CPU, nccl on CUDA.

torchrun (or any launcher that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT) starts
the processes; a plain `plora train` is a world of one and never touches torch.distributed.

Collectives first wait up to PROCESS_GROUP_TIMEOUT (3 hours, not torch's 10/30 minutes): before
training, rank 0 of the guide script may tokenize a large dataset while every other process waits for it
in a collective, and the first step loads, compiles and warms up. After the first step the trainer
lowers the timeout to ``--dist-timeout-minutes`` (as torchtitan does), so a process that hangs later is
reported in minutes, not hours.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from parallel.errors import PloraError
from trainer.fsdp import is_sharded, require_processes, shard_model

PROCESS_GROUP_TIMEOUT = datetime.timedelta(hours=3)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def pick_device(option: str, local_rank: int) -> torch.device:
    """``auto``: this process's GPU under CUDA, else the CPU."""
    if option == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(option)
    except RuntimeError as err:
        raise PloraError(f"--device {option!r}: {err}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PloraError(f"--device {option}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def init_distributed(device_option: str) -> DistEnv:
    """This process's rank and device; under a launcher, joins the process group (gloo: CPU, nccl: CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_option, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=PROCESS_GROUP_TIMEOUT)
    return DistEnv(rank, world_size, local_rank, device)


def wrap(loss_module: nn.Module, model: nn.Module, env: DistEnv, *, fsdp: bool) -> nn.Module:
    """The module the loop trains through, on ``env.device``: DDP over the processes, FSDP2 with
    ``--fsdp`` (in place: ``loss_module`` itself, sharded; its base from
    :func:`trainer.fsdp.load_base_for_sharding`), or ``loss_module`` alone in a world of one."""
    if fsdp:
        require_processes(env)
        shard_model(loss_module, model, env.world_size, env.device)
        return loss_module
    loss_module.to(env.device)
    if not env.is_distributed:
        return loss_module
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(loss_module, device_ids=device_ids)


@contextlib.contextmanager
def gradient_sync(module: nn.Module, sync: bool) -> Iterator[None]:
    """Backward inside reduces gradients over the processes only if ``sync`` (the last micro-batch of a
    step); the others accumulate locally."""
    if isinstance(module, DistributedDataParallel) and not sync:
        with module.no_sync():
            yield
    elif is_sharded(module):
        module.set_requires_gradient_sync(sync)  # type: ignore[operator]
        yield
    else:
        yield


def wait_for_all(env: DistEnv) -> None:
    """Blocks until every process arrives; the last collective before any process leaves."""
    if env.is_distributed:
        _hold(dist.barrier(async_op=True))


def shorten_timeout(env: DistEnv, timeout: datetime.timedelta) -> None:
    """From now on a collective fails after ``timeout``. The barrier first: a process still in slow
    startup work, allowed under the long timeout, must not meet a peer already on the short one."""
    if env.is_distributed:
        _hold(dist.barrier(async_op=True))
        # Private but stable (torch >= 2.3, the API torchtitan uses); sets gloo's and nccl's default.
        dist.distributed_c10d._set_pg_timeout(timeout)


def shutdown(env: DistEnv) -> None:
    if env.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


# The last collectives the trainer waits on, kept alive to the end of the process. A gloo worker thread
# frees a finished collective, and a barrier holds the collectives still in flight when it starts (an FSDP
# checkpoint's gathers, an all_sum); freeing one whose tensor Python created decrefs that tensor's Python
# object, so the worker needs the GIL. The main thread holds the GIL while it frees the DDP reducer, whose
# process group joins the worker threads: a worker still freeing the last all_sum there waits for the GIL
# forever (py-spy on a hung 2-process run: MainThread in ~ProcessGroupGloo -> std::thread::join; the
# worker in ~AsyncBarrierWork -> ~AsyncAllreduceWork -> decref_pyobject -> gil_scoped_acquire). Before, a
# worker that freed one during interpreter finalization aborted the process instead ("terminate called
# without an active exception"). Held here, no worker frees the last one; the main thread does, with the
# GIL, at exit: the barriers are held too, so whatever came before the last one is released with it.
_HELD_WORKS: collections.deque[dist.Work] = collections.deque(maxlen=8)


def all_sum(values: list[float], env: DistEnv) -> list[float]:
    """Element-wise sum over all processes (float64, so token counts stay exact)."""
    if not env.is_distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=env.device)
    _hold(dist.all_reduce(tensor, async_op=True))
    return tensor.tolist()


def _hold(work: dist.Work) -> None:
    """Waits for ``work`` and keeps it (see _HELD_WORKS)."""
    work.wait()
    _HELD_WORKS.append(work)
