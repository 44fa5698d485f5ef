"""Which numeric format and memory layout training runs in: bfloat16 autocast where the CPU has native bf16
kernels, channels_last on every CPU, unless the config says otherwise; and the record of what ran.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from lesionseg.train import allocator
from lesionseg.train.config import TrainConfig


def warn_if_slow_bf16(device: torch.device, amp: bool) -> None:
    """bfloat16 convolutions are fast only where oneDNN has native bf16 (AVX512-BF16, AMX); elsewhere PyTorch
    falls back to a generic im2col path about 10x slower than float32 (benchmarks/README.md, "bf16")."""
    if amp and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        print(
            "lesionseg: WARNING: --amp on this CPU (no AVX512-BF16 or AMX) runs bfloat16 convolutions on a slow "
            "path, about 10x slower than float32; train without --amp here",
            file=sys.stderr,
        )


def bf16_is_native() -> bool:
    """oneDNN has bfloat16 kernels for this CPU (AVX512-BF16 or AMX)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_formats(config: TrainConfig, device: torch.device) -> tuple[bool, bool]:
    """(amp, channels_last) as the config asks, or, where it leaves them open (None), what measured fastest without
    losing accuracy: bfloat16 on CPUs with native bf16, NHWC on every CPU (benchmarks/README.md, "Training speed")."""
    on_cpu = device.type == "cpu"
    amp = config.amp if config.amp is not None else on_cpu and bf16_is_native()
    channels_last = config.channels_last if config.channels_last is not None else on_cpu
    return amp, channels_last


def what_ran(device: torch.device, amp: bool, channels_last: bool) -> dict[str, Any]:
    """The numeric settings of the run, for run.json and the log: they change speed, and rounding."""
    precision = ("bfloat16 autocast" if device.type == "cpu" else "float16 autocast") if amp else "float32"
    return {
        "device": str(device),
        "precision": precision,
        "memory_format": "channels_last" if channels_last else "contiguous",
        "allocator": allocator.describe(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_native": bf16_is_native(),
        "threads": torch.get_num_threads(),
        "compiled": False,
    }


def autocast(device: torch.device, enabled: bool):
    """Mixed precision: bfloat16 on the CPU (no loss scaling needed), float16 on CUDA (with the GradScaler)."""
    return torch.autocast(device.type, dtype=torch.bfloat16 if device.type == "cpu" else torch.float16, enabled=enabled)
