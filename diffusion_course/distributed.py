"""Several processes, one model: the little that training needs from ``torch.distributed``.

Taught in lesson 04_unet. ``torchrun --nproc_per_node=N -m diffusion_course train ...`` starts N copies of
the training command and tells each its place through environment variables (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Each copy joins one process group, wraps its model in
``DistributedDataParallel`` (which averages the gradients over the processes in ``backward``), trains on
its own share of every batch, and only rank 0 writes files. Nothing here is home-made parallelism: it is
PyTorch's, with NCCL between GPUs and gloo between CPU processes.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from .utils import get_device


@dataclass
class DistInfo:
    """Where this process stands in a multi-process run (a single process: rank 0 of 1). Lesson: 04_unet."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """True when there are several processes to keep in step."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that shows progress and writes files."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when the environment names this process's rank and the number of processes. Lesson: 04_unet."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup_distributed(device: Optional[str] = None) -> Tuple[DistInfo, torch.device, bool]:
    """Join the process group when launched by ``torchrun``: NCCL on CUDA (one GPU per process,
    ``cuda:LOCAL_RANK``), gloo on the CPU. Without torchrun: rank 0 of 1 on the best device. Returns
    ``(info, device, created)``, ``created`` telling whether this call made the group. Lesson: 04_unet."""
    if not launched_by_torchrun():
        return DistInfo(), get_device(device), False
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    dev = get_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        warnings.warn(f"multi-process training runs on CUDA or the CPU, not {dev.type}; using the CPU")
        dev = torch.device("cpu")
    if dist.is_initialized():
        return info, dev, False
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=info.rank, world_size=info.world_size)
    return info, dev, True


def mean_over_processes(value: torch.Tensor, info: DistInfo) -> float:
    """The mean of a scalar tensor over all processes (itself when there is one). Lesson: 04_unet."""
    value = value.detach().float()
    if info.enabled:
        dist.all_reduce(value)
        value = value / info.world_size
    return float(value)


def gather_objects(obj: Any, info: DistInfo) -> List[Any]:
    """Every process's ``obj``, in rank order, on every process (``[obj]`` for one process). Lesson: 04_unet."""
    if not info.enabled:
        return [obj]
    out: List[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


@contextlib.contextmanager
def main_process_first(info: DistInfo) -> Iterator[None]:
    """Run the body on rank 0 first, then on the others (e.g. a data set download, so that processes do
    not download into the same folder at once). Lesson: 04_unet."""
    if not info.is_main:
        barrier(info)
    yield
    if info.is_main:
        barrier(info)


def barrier(info: DistInfo) -> None:
    """Wait until every process gets here (nothing for one process). Lesson: 04_unet."""
    if info.enabled:
        dist.barrier()


def leave_process_group() -> None:
    """Destroy the default process group, if there is one. Lesson: 04_unet."""
    if dist.is_initialized():
        dist.destroy_process_group()
