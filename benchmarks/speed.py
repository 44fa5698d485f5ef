"""Training and inference speed of the paper's model, our U-Net and smp's Unet on this machine.

For each model: training images/s (batch 16), inference batch-1 latency and batch-32 throughput in
PyTorch eager, with channels_last, and in onnxruntime; FLOPs per image; and the share of the CPU's
measured fp32 matmul peak each reaches (FLOPs/image x images/s / peak). Masks from every backend
are compared with eager's (share of pixels that differ).

    .venv/bin/python benchmarks/speed.py [--size 128] [--out benchmarks/results/speed/speed.json]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from common import write_result
from lesionseg.segment.predictors import OnnxPredictor
from lesionseg.train.checkpoint import save_checkpoint
from lesionseg.train.config import TrainConfig
from lesionseg.train.export import export_onnx
from lesionseg.train.losses import WeightedSum
from lesionseg.train.models import build_model
from lesionseg.train.predictor import TorchPredictor

MODELS = {  # label: (arch, decoder attention)
    "seed": ("seed", "none"),
    "unet": ("unet", "none"),
    "unet+scse": ("unet", "scse"),
    "smp-unet": ("smp-unet", "none"),
}


def best_rate(fn, items: int, repeats: int, warmup: int = 2) -> float:
    """Items per second of the fastest of `repeats` timed calls (the least disturbed by other work)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return items / min(times)


def matmul_peak_gflops(n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return best_rate(lambda: torch.mm(a, b), 2 * n**3, repeats) / 1e9


def onnxruntime_matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    """fp32 GEMM in onnxruntime's own kernels (MLAS), all threads: what its convolutions are built on."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "gemm",
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in "ab"],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {x: np.random.default_rng(0).standard_normal((n, n), dtype=np.float32) for x in "ab"}
    return best_rate(lambda: session.run(None, feeds), 2 * n**3, repeats) / 1e9


def cpu_facts() -> dict:
    """CPU name, cores, base clock and vector ISA from the kernel (/proc/cpuinfo, sysfs, dmesg's TSC line)."""
    import os
    import re
    import subprocess

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    field = lambda key: next(
        (line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith(key)), None
    )  # noqa: E731
    flags = set((field("flags") or "").split())
    mhz = field("cpu MHz")
    if mhz is None:  # virtual machines often hide it; the kernel's TSC calibration is the base clock
        log = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
        found = re.search(r"tsc: Detected ([\d.]+) MHz", log)
        mhz = found.group(1) if found else None
    return {
        "name": field("model name"),
        "family": field("cpu family"),
        "model": field("model"),
        "cores": os.cpu_count(),
        "base_mhz": float(mhz) if mhz else None,
        "isa": "avx512f" if "avx512f" in flags else "avx2+fma" if {"avx2", "fma"} <= flags else "sse",
    }


def theoretical_peak_gflops(cpu: dict) -> tuple[float | None, str]:
    """cores x clock x FLOP/cycle. FLOP/cycle per core = 2 (an FMA) x fp32 lanes x FMA pipes: 2 pipes of
    256 bits on Intel since Haswell and AMD since Zen 2, 2 of 512 bits with AVX-512 (Skylake-SP Gold, Zen 4
    runs 512 as 2x256); AMD Zen 1 (family 23, model < 0x30) splits 256-bit ops over 2 pipes of 128 bits
    (AMD's Software Optimization Guide for family 17h; Agner Fog's microarchitecture manual)."""
    if not cpu["base_mhz"]:
        return None, "clock unknown"
    lanes = {"avx512f": 16, "avx2+fma": 8, "sse": 4}[cpu["isa"]]
    zen1 = cpu["family"] == "23" and int(cpu["model"] or 0) < 0x30
    flop_per_cycle = 2 * (4 if zen1 else lanes) * 2
    note = f"{cpu['cores']} cores x {cpu['base_mhz'] / 1000:.2f} GHz (base) x {flop_per_cycle} FLOP/cycle ({cpu['isa']}{', Zen 1' if zen1 else ''})"
    return cpu["cores"] * cpu["base_mhz"] / 1000 * flop_per_cycle, note


def flops_per_image(model: torch.nn.Module, size: int) -> float:
    import torchinfo

    return 2 * torchinfo.summary(model, input_size=(1, 3, size, size), verbose=0).total_mult_adds


def training_rate(label: str, size: int, batch: int = 16, steps: int = 4) -> float:
    torch.manual_seed(0)
    arch, attention = MODELS[label]
    model = build_model(arch, attention=attention).train()
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    loss_fn = WeightedSum({"bce": 1.0})
    x, y = torch.randn(batch, 3, size, size), (torch.rand(batch, 1, size, size) > 0.5).float()

    def step():
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return best_rate(step, batch, steps)


def checkpoint_for(label: str, size: int, folder: Path) -> Path:
    """A checkpoint with random weights, so every backend is built the way users build it."""
    torch.manual_seed(0)
    arch, attention = MODELS[label]
    model = build_model(arch, attention=attention).eval()
    config = TrainConfig(arch=arch, image_size=size, weights="none", decoder_attention=attention)
    path = folder / f"{label}.pt"
    save_checkpoint(
        {"model": model.state_dict(), "config": config.to_dict(), "epoch": 0, "best_metric": None, "history": []}, path
    )
    return path


def measure(label: str, size: int, folder: Path, repeats: int) -> dict:
    checkpoint = checkpoint_for(label, size, folder)
    backends = {
        "eager": TorchPredictor(checkpoint),
        "channels_last": TorchPredictor(checkpoint, channels_last=True),
        "onnxruntime": OnnxPredictor(export_onnx(checkpoint, folder / f"{label}.onnx")),
    }
    one = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8)
    batch = torch.randint(0, 256, (32, 3, size, size), dtype=torch.uint8)
    reference = backends["eager"](batch) >= 0.5
    flops = flops_per_image(backends["eager"].model, size)
    result = {
        "flops_per_image": flops,
        "train_images_per_s": training_rate(label, size),
        "web_upload_seconds_1504x1129": upload_seconds(checkpoint),
    }
    for name, predictor in backends.items():
        result[name] = {
            "batch1_latency_ms": 1000 / best_rate(lambda: predictor(one), 1, repeats * 4),
            "batch32_images_per_s": best_rate(lambda: predictor(batch), 32, repeats),
            "mask_pixels_differing_from_eager": float(((predictor(batch) >= 0.5) != reference).mean()),
        }
    return result


def upload_seconds(checkpoint: Path, width: int = 1504, height: int = 1129, repeats: int = 5) -> float:
    """Median time of POST /predict for a JPEG of a typical ISIC 2016 size: decode (reduced), resize, predict,
    mask PNG, in-process through FastAPI's test client."""
    import io

    import numpy as np
    from fastapi.testclient import TestClient
    from PIL import Image

    from lesionseg.segment.serve import create_app

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, "JPEG")
    client = TestClient(create_app(TorchPredictor(checkpoint)))
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        assert client.post("/predict", files={"file": ("x.jpg", buffer.getvalue(), "image/jpeg")}).status_code == 200
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[repeats // 2]


def table(results: dict, peak: float, peaks: dict) -> str:
    uploads = ", ".join(f"{arch} {r['web_upload_seconds_1504x1129']:.2f} s" for arch, r in results.items())
    lines = [
        "fp32 peaks, GFLOP/s: " + "; ".join(f"{k} {v:.1f}" for k, v in peaks.items() if isinstance(v, float)),
        f"% of peak is against the highest measured one, {peak:.1f}; web POST /predict of a 1504x1129 JPEG: {uploads}",
        "",
        "| model | GFLOP/img | train img/s | backend | batch-1 ms | batch-32 img/s | % of peak | masks differing |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arch, r in results.items():
        for backend in ("eager", "channels_last", "onnxruntime"):
            b = r[backend]
            share = 100 * r["flops_per_image"] * b["batch32_images_per_s"] / (peak * 1e9)
            lines.append(
                f"| {arch} | {r['flops_per_image'] / 1e9:.2f} | {r['train_images_per_s']:.1f} | {backend} | "
                f"{b['batch1_latency_ms']:.1f} | {b['batch32_images_per_s']:.1f} | {share:.0f} % | "
                f"{b['mask_pixels_differing_from_eager']:.1e} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--out", default="benchmarks/results/speed/speed.json")
    args = parser.parse_args()
    cpu = cpu_facts()
    theoretical, how = theoretical_peak_gflops(cpu)
    peaks = {
        "torch.mm 2048": matmul_peak_gflops(2048),
        "torch.mm 4096": matmul_peak_gflops(4096, 4),
        "onnxruntime MatMul 2048": onnxruntime_matmul_gflops(2048),
        "onnxruntime MatMul 4096": onnxruntime_matmul_gflops(4096, 4),
    }
    peak = max(peaks.values())  # the fastest GEMM this machine ran: no backend can beat it on convolutions
    peaks |= {"theoretical": theoretical, "theoretical_from": how}
    with tempfile.TemporaryDirectory() as tmp:
        results = {label: measure(label, args.size, Path(tmp), args.repeats) for label in args.models}
    print(table(results, peak, peaks))
    machine = {
        "processor": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": "cpu",
        "cpu": cpu,
    }
    write_result(
        args.out,
        {"machine": machine, "size": args.size, "matmul_peak_gflops": peak, "peaks_gflops": peaks, "models": results},
    )


if __name__ == "__main__":
    main()
