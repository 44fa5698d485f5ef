"""The same exported model in the runtimes a CPU with int8 dot products (AVX-512 VNNI, AMX) offers: onnxruntime
float32 and int8 (the file `lesionseg export --int8` writes), and OpenVINO reading the same two ONNX files, with
float32 and with bf16 inference precision. Batch-32 throughput on 2 threads, the variants taking turns round by
round in one process (best of the rounds), and, with --data, each variant's test Jaccard at the model's size.

    .venv/bin/python benchmarks/int8_runtimes.py --fp32 runs/int8/fp32.onnx --int8 runs/int8/int8.onnx \
        --data ../shared/data/isic2016-256 --out benchmarks/results/int8/runtimes-spr.json
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from common import write_result

Run = Callable[[np.ndarray], np.ndarray]


def onnxruntime_run(path: Path, threads: int) -> Run:
    from lesionseg.segment.predictors import open_session

    session = open_session(path, threads)
    return lambda x: session.run(None, {"image": x})[0]


def openvino_run(path: Path, threads: int, precision: str) -> Run:
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision}
    compiled = core.compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()
    return lambda x: request.infer({"image": x})[compiled.output(0)].copy()


def variants(fp32: Path, int8: Path, threads: int) -> dict[str, Run]:
    return {
        "onnxruntime float32": onnxruntime_run(fp32, threads),
        "onnxruntime int8": onnxruntime_run(int8, threads),
        "openvino float32": openvino_run(fp32, threads, "f32"),
        "openvino bf16": openvino_run(fp32, threads, "bf16"),
        "openvino int8": openvino_run(int8, threads, "f32"),
        "openvino int8 + bf16": openvino_run(int8, threads, "bf16"),
    }


def rates(runs: dict[str, Run], batch: np.ndarray, rounds: int) -> dict[str, float]:
    """Best images/s of each variant over `rounds` turns, the variants alternating."""
    for run in runs.values():
        run(batch)  # warm-up
    best = dict.fromkeys(runs, 0.0)
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run(batch)
            best[name] = max(best[name], len(batch) / (time.perf_counter() - start))
    return best


def test_jaccard(runs: dict[str, Run], data: Path, size: int) -> dict[str, float]:
    """Mean per-image Jaccard of each variant's masks on the test split, at the model's size."""
    import torch

    from lesionseg.train.data import load_split
    from lesionseg.train.metrics import MetricAccumulator

    test = load_split(data, "test", size, quiet=True)
    x = test.images.numpy().astype(np.float32) / 255
    scores = {}
    for name, run in runs.items():
        probability = np.concatenate([run(x[i : i + 32]) for i in range(0, len(x), 32)])
        metrics = MetricAccumulator(0.5)
        metrics.update(torch.logit(torch.from_numpy(probability).clamp(1e-6, 1 - 1e-6)), test.masks.float())
        scores[name] = metrics.compute()["iou_per_image"]
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fp32", type=Path, required=True)
    parser.add_argument("--int8", type=Path, required=True)
    parser.add_argument("--data", type=Path, help="score each variant on this folder's test split")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    runs = variants(args.fp32, args.int8, args.threads)
    size = 128
    batch = np.random.default_rng(0).uniform(0, 1, (args.batch, 3, size, size)).astype(np.float32)
    result = {"batch": args.batch, "threads": args.threads}
    for label, n in (("batch", args.batch), ("single", 1)):
        measured = rates(runs, batch[:n], args.rounds)
        result[f"images_per_s_{label}"] = measured
        base = measured["onnxruntime float32"]
        print(label, {name: f"{rate:.1f} ({rate / base:.2f}x)" for name, rate in measured.items()})
    if args.data:
        result["test_jaccard_model_size"] = test_jaccard(runs, args.data, size)
        print({name: f"{value:.4f}" for name, value in result["test_jaccard_model_size"].items()})
    write_result(args.out, result)


if __name__ == "__main__":
    main()
