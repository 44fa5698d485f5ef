"""Training throughput by numeric format on this CPU: float32, channels_last, bfloat16 autocast (`--amp`),
and torch.compile, for the paper's model and our U-Net. The variants take turns step by step in one
process, so their ratios hold on a busy or slower machine; with --profile, the top operators of one
float32 and one bfloat16 step say where the time goes.

    .venv/bin/python benchmarks/train_precision.py --out benchmarks/results/train_precision/train-precision.json [--compile]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from common import write_result
from lesionseg.losses import WeightedSum
from lesionseg.models import build_model

MODELS = {"paper": ("seed", "none"), "unet+scse": ("unet", "scse")}


def cpu_flags() -> list[str]:
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return [flag for flag in wanted if flag in line.split()]
    return []


def make_step(label: str, size: int, batch: int, amp: bool, channels_last: bool, compile_model: bool):
    """One optimizer step of the model on a fixed random batch, in the given format."""
    torch.manual_seed(0)
    arch, attention = MODELS[label]
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(arch, attention=attention).train().to(memory_format=memory_format)
    forward = torch.compile(model) if compile_model else model
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    loss_fn = WeightedSum({"bce": 1.0, "dice": 1.0})
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=memory_format)
    y = (torch.rand(batch, 1, size, size) > 0.5).float()

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(forward(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def top_operators(step, rows: int = 8) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    return [{"op": e.key, "self_ms": e.self_cpu_time_total / 1000, "calls": e.count} for e in events]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--compile", action="store_true", help="also torch.compile (minutes of compiling)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    variants = {
        "float32": (False, False, False),
        "channels_last": (False, True, False),
        "bf16": (True, False, False),
        "bf16+channels_last": (True, True, False),
    }
    if args.compile:
        variants |= {"compile": (False, False, True), "compile+bf16+channels_last": (True, True, True)}
    result = {
        "cpu_flags": cpu_flags(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "batch": args.batch,
        "size": args.size,
        "models": {},
    }
    for label in MODELS:
        steps = {name: make_step(label, args.size, args.batch, *flags) for name, flags in variants.items()}
        for step in steps.values():  # warm-up (and compilation)
            step()
        best = dict.fromkeys(steps, 0.0)
        for _ in range(args.rounds):
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                best[name] = max(best[name], args.batch / (time.perf_counter() - start))
        rows = {name: {"images_per_s": rate, "vs_float32": rate / best["float32"]} for name, rate in best.items()}
        if args.profile:
            rows["float32"]["profile"] = top_operators(steps["float32"])
            rows["bf16"]["profile"] = top_operators(steps["bf16"])
        result["models"][label] = rows
        print(
            label,
            {name: f"{r['images_per_s']:.1f} img/s ({r['vs_float32']:.2f}x)" for name, r in rows.items()},
            flush=True,
        )
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    main()
