"""Training and inference speed of the paper's model, our U-Net and smp's Unet on this machine.

For each model: training images/s (batch 16), inference batch-1 latency and batch-32 throughput in
PyTorch eager, with channels_last, and in onnxruntime; FLOPs per image; and the share of the CPU's
measured fp32 matmul peak each reaches (FLOPs/image x images/s / peak). Masks from every backend
are compared with eager's (share of pixels that differ).

    .venv/bin/python benchmarks/speed.py [--size 128] [--out benchmarks/results/speed.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from lesionseg.config import TrainConfig
from lesionseg.export import export_onnx
from lesionseg.losses import WeightedSum
from lesionseg.models import build_model
from lesionseg.prediction import OnnxPredictor, TorchPredictor
from lesionseg.training import save_checkpoint

MODELS = {  # label: (arch, decoder attention)
    "seed": ("seed", "none"), "unet": ("unet", "none"), "unet+scse": ("unet", "scse"), "smp-unet": ("smp-unet", "none"),
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


def flops_per_image(model: torch.nn.Module, size: int) -> float:
    import torchinfo

    return 2 * torchinfo.summary(model, input_size=(1, 3, size, size), verbose=0).total_mult_adds


def training_rate(label: str, size: int, batch: int = 16, steps: int = 4) -> float:
    torch.manual_seed(0)
    arch, attention = MODELS[label]
    model = build_model(arch, weights="none", attention=attention).train()
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
    model = build_model(arch, weights="none", attention=attention).eval()
    config = TrainConfig(arch=arch, image_size=size, weights="none", decoder_attention=attention)
    path = folder / f"{label}.pt"
    save_checkpoint({"model": model.state_dict(), "config": config.to_dict(), "epoch": 0, "best_metric": None,
                     "history": []}, path)
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
    result = {"flops_per_image": flops, "train_images_per_s": training_rate(label, size),
              "web_upload_seconds_1504x1129": upload_seconds(checkpoint)}
    for name, predictor in backends.items():
        result[name] = {
            "batch1_latency_ms": 1000 / best_rate(lambda: predictor(one), 1, repeats * 4),
            "batch32_images_per_s": best_rate(lambda: predictor(batch), 32, repeats),
            "mask_pixels_differing_from_eager": float(((predictor(batch) >= 0.5) != reference).mean()),
        }
    return result


def upload_seconds(checkpoint: Path, width: int = 1504, height: int = 1129, repeats: int = 5) -> float:
    """Median time of POST /predict for a JPEG of a typical ISIC 2016 size: decode, resize, predict, PNGs."""
    import io

    import numpy as np
    from fastapi.testclient import TestClient
    from PIL import Image

    from lesionseg.serve import create_app

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, "JPEG")
    client = TestClient(create_app(TorchPredictor(checkpoint)))
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        assert client.post("/predict", files={"file": ("x.jpg", buffer.getvalue(), "image/jpeg")}).status_code == 200
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[repeats // 2]


def table(results: dict, peak: float) -> str:
    uploads = ", ".join(f"{arch} {r['web_upload_seconds_1504x1129']:.2f} s" for arch, r in results.items())
    lines = [f"fp32 matmul peak: {peak:.1f} GFLOP/s; web POST /predict of a 1504x1129 JPEG: {uploads}", "",
             "| model | GFLOP/img | train img/s | backend | batch-1 ms | batch-32 img/s | % of peak | masks differing |",
             "|---|---|---|---|---|---|---|---|"]
    for arch, r in results.items():
        for backend in ("eager", "channels_last", "onnxruntime"):
            b = r[backend]
            share = 100 * r["flops_per_image"] * b["batch32_images_per_s"] / (peak * 1e9)
            lines.append(f"| {arch} | {r['flops_per_image'] / 1e9:.2f} | {r['train_images_per_s']:.1f} | {backend} | "
                         f"{b['batch1_latency_ms']:.1f} | {b['batch32_images_per_s']:.1f} | {share:.0f} % | "
                         f"{b['mask_pixels_differing_from_eager']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--out", default="benchmarks/results/speed.json")
    args = parser.parse_args()
    peak = matmul_peak_gflops()
    with tempfile.TemporaryDirectory() as tmp:
        results = {label: measure(label, args.size, Path(tmp), args.repeats) for label in args.models}
    print(table(results, peak))
    machine = {"processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "device": "cpu"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine, "size": args.size, "matmul_peak_gflops": peak,
                                          "models": results}, indent=2))


if __name__ == "__main__":
    main()
