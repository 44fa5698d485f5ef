"""What machine ran something: the CPU's model, family and vector instructions, the cores; the GPU if one ran.
"AMD EPYC" alone covers machines that differ 2x in speed, so run.json and every benchmark record this."""

from __future__ import annotations

import os
import platform
import re
import sys
from pathlib import Path
from typing import Any

from lesionseg.errors import LesionsegError

VECTOR_FLAGS = ("avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "avx2")
MAX_PROCESSES = 100_000  # far beyond any cluster; bounds every list made per process or shard


def environment_number(name: str, default: int) -> int:
    """A count from the environment (torchrun's RANK, WORLD_SIZE, LOCAL_RANK): ASCII digits up to
    MAX_PROCESSES, else one line naming the variable."""
    text = os.environ.get(name)
    if text is None:
        return default
    if not re.fullmatch(r"[0-9]{1,6}", text.strip()) or int(text) > MAX_PROCESSES:
        raise LesionsegError(f"{name}={text[:20]!r}: expected a whole number from 0 to {MAX_PROCESSES:,}")
    return int(text)


def process_rank() -> tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) as torchrun sets them, checked: 0 <= RANK < WORLD_SIZE."""
    rank, world, local = (environment_number(n, d) for n, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    if world < 1 or rank >= world:
        raise LesionsegError(f"RANK={rank} WORLD_SIZE={world}: expected 0 <= RANK < WORLD_SIZE")
    return rank, world, local


def cpu_info() -> dict[str, Any]:
    info: dict[str, str] = {}
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    flags = set(info.get("flags", "").split())
    return {
        "model": info.get("model name", platform.processor() or platform.machine()),
        "family": info.get("cpu family"),
        "model_number": info.get("model"),
        "vector": [name for name in VECTOR_FLAGS if name in flags],
        "cores": os.cpu_count(),
    }


def device_name() -> str:
    """The GPU when PyTorch (already imported) sees one, else the CPU in one line."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = cpu_info()
    if cpu["family"] is None:
        return f"CPU: {cpu['model']}, {cpu['cores']} cores"
    return (
        f"CPU: {cpu['model']} (family {cpu['family']} model {cpu['model_number']}, "
        f"{'/'.join(cpu['vector']) or 'no AVX2'}), {cpu['cores']} cores"
    )
