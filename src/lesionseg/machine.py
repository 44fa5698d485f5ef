"""What machine ran something: the CPU's model, family and vector instructions, the cores; the GPU if one ran.
"AMD EPYC" alone covers machines that differ 2x in speed, so run.json and every benchmark record this."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

VECTOR_FLAGS = ("avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "avx2")


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
