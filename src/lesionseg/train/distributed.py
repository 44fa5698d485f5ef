"""Data-parallel training on PyTorch's own engine, launched by torchrun; one process is the same code.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them this is a single process of rank 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from lesionseg.errors import LesionsegError
from lesionseg.machine import process_rank


@dataclass(frozen=True)
class Process:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only the main process logs, draws progress bars and writes checkpoints."""
        return self.rank == 0


def init_process(device: str = "auto") -> Process:
    rank, world, local_rank = process_rank()
    if world == 1:
        return Process()
    process = Process(rank, world, local_rank)
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(process.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return process


def resolve_device(name: str, process: Process) -> torch.device:
    """The device to train on; a GPU that this machine does not have is one line, not PyTorch's traceback."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.partition(":")[2] or 0)
        if index >= count:
            found = f"{count} CUDA GPU(s)" if count else "no CUDA GPU"
            raise LesionsegError(f"--device {name}: PyTorch sees {found} here; use --device cpu or auto")
    if name == "cuda" and process.world > 1:
        name = f"cuda:{process.local_rank}"
    return torch.device(name)


def mean_across(value: float, count: int, process: Process, device: torch.device) -> float:
    """Count-weighted mean of a per-process average over all processes."""
    if process.world == 1:
        return value
    totals = torch.tensor([value * count, float(count)], dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return (totals[0] / totals[1]).item()


def barrier(process: Process) -> None:
    if process.world > 1:
        dist.barrier()
