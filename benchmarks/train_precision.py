"""Training throughput by numeric format on this CPU: float32, channels_last, bfloat16 autocast (`--amp`),
and torch.compile, for the paper's model and our U-Net. The variants take turns step by step in one
process, so their ratios hold on a busy or slower machine; with --profile, the top operators of one
float32 and one bfloat16 step say where the time goes.

    .venv/bin/python benchmarks/train_precision.py --out benchmarks/results/train_precision/train-precision.json [--compile]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path
from unittest import mock

import torch

from common import write_result
from lesionseg.train import models
from lesionseg.train.losses import WeightedSum
from lesionseg.train.models import build_model

MODELS = {"paper": ("seed", "none"), "unet+scse": ("unet", "scse")}


def cpu_flags() -> list[str]:
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return [flag for flag in wanted if flag in line.split()]
    return []


def as_stock(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """Undo lesionseg's two layer-level speed fixes on `model` (stride-2 depthwise convolutions in float32 under
    bf16 autocast; channels_last gradients into the U-Net's upsampling), for the step they are measured against;
    the returned context turns the second one off while a step runs."""
    for module in model.modules():
        if isinstance(module, models.Float32Conv2d):
            module.__class__ = torch.nn.Conv2d
    return mock.patch.object(models.ChannelsLastGradient, "apply", staticmethod(lambda x: x))


def make_step(
    label: str, size: int, batch: int, amp: bool, channels_last: bool, compile_model: bool, stock: bool = False
):
    """One optimizer step of the model on a fixed random batch, in the given format (`stock`: without the fixes)."""
    torch.manual_seed(0)
    arch, attention = MODELS[label]
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(arch, attention=attention).train().to(memory_format=memory_format)
    context = as_stock(model) if stock else contextlib.nullcontext()
    forward = torch.compile(model) if compile_model else model
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    loss_fn = WeightedSum({"bce": 1.0, "dice": 1.0})
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=memory_format)
    y = (torch.rand(batch, 1, size, size) > 0.5).float()

    def step() -> None:
        with context, torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(forward(x), y)
        with context:
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


ALLOCATORS = {  # name -> LD_PRELOAD (Debian's libtcmalloc-minimal4 and libjemalloc2)
    "glibc": "",
    "tcmalloc": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "jemalloc": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
}


def variants_for(compile_too: bool) -> dict[str, tuple[bool, bool, bool, bool]]:
    """name -> (amp, channels_last, compile, stock); "float32" is the stock model, as training ran before."""
    variants = {
        "float32": (False, False, False, True),
        "channels_last": (False, True, False, False),
        "bf16": (True, False, False, False),
        "bf16+channels_last stock": (True, True, False, True),
        "bf16+channels_last": (True, True, False, False),
    }
    if compile_too:
        variants |= {
            "compile+channels_last": (False, True, True, False),
            "compile+bf16+channels_last": (True, True, True, False),
        }
    return variants


def measure(args: argparse.Namespace) -> dict:
    """Every variant of both models in this process, taking turns step by step; best images/s of each."""
    variants = variants_for(args.compile)
    result = {"models": {}, "warmup_seconds": {}}
    for label in args.models:
        steps = {name: make_step(label, args.size, args.batch, *flags) for name, flags in variants.items()}
        for name, step in steps.items():  # warm-up (and compilation: its time is the warm-up's)
            start = time.perf_counter()
            step()
            result["warmup_seconds"][f"{label} {name}"] = time.perf_counter() - start
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
    return result


def across_allocators(args: argparse.Namespace, argv: list[str]) -> dict:
    """Each allocator in its own process (it is chosen at load time), alternating round by round; best of the
    rounds per variant, and every rate as a ratio to glibc's float32 from the same rounds."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    best: dict = {}
    warmup: dict = {}
    for _ in range(args.allocator_rounds):
        for name in args.allocators:
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                env = dict(os.environ, LD_PRELOAD=ALLOCATORS[name])
                child = [sys.executable, __file__, *argv, "--child", out.name]
                subprocess.run(child, env=env, check=True)
                child_result = json.loads(Path(out.name).read_text())
            for key, seconds in child_result["warmup_seconds"].items():
                warmup[f"{name} {key}"] = max(warmup.get(f"{name} {key}", 0.0), seconds)
            for label, rows in child_result["models"].items():
                for variant, row in rows.items():
                    key = (name, label, variant)
                    best[key] = max(best.get(key, 0.0), row["images_per_s"])
    table: dict = {}
    for (name, label, variant), rate in best.items():
        base = (
            best[("glibc", label, "float32")]
            if "glibc" in args.allocators
            else best[(args.allocators[0], label, "float32")]
        )
        table.setdefault(label, {}).setdefault(name, {})[variant] = {
            "images_per_s": rate,
            "vs_glibc_float32": rate / base,
        }
    return {"models": table, "allocator_rounds": args.allocator_rounds, "warmup_seconds": warmup}


def main() -> None:
    import json
    import sys

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4, help="steps of each variant within one process")
    parser.add_argument("--compile", action="store_true", help="also torch.compile (minutes of compiling)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--allocators", nargs="+", choices=ALLOCATORS, help="one process per allocator, alternating")
    parser.add_argument("--allocator-rounds", type=int, default=3, help="processes per allocator (best of them)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    about = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_flags": cpu_flags(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "batch": args.batch,
        "size": args.size,
    }
    if args.child:
        args.child.write_text(json.dumps(measure(args)))
        return
    if args.allocators:
        argv = [a for a in sys.argv[1:]]
        for flag in ("--allocators", "--allocator-rounds", "--out"):  # what the parent alone decides
            if flag in argv:
                i = argv.index(flag)
                j = i + 1
                while j < len(argv) and not argv[j].startswith("--"):
                    j += 1
                del argv[i:j]
        result = about | across_allocators(args, argv)
        for label, allocators in result["models"].items():
            for name, rows in allocators.items():
                print(
                    label, name, {v: f"{r['images_per_s']:.1f} ({r['vs_glibc_float32']:.2f}x)" for v, r in rows.items()}
                )
    else:
        result = about | measure(args)
        for label, rows in result["models"].items():
            print(label, {v: f"{r['images_per_s']:.1f} img/s ({r['vs_float32']:.2f}x)" for v, r in rows.items()})
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    main()
