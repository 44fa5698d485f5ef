"""Which int8 recipe holds accuracy, and how fast is it? For each float32 model and each recipe: quantize
(calibrated on training images only), score on the test split at the stored resolution (mean per-image
Jaccard, paired interval against float32), and time batch-32 onnxruntime throughput against float32,
alternating the two in one process so the ratio holds on a busy or slower machine.

    .venv/bin/python benchmarks/int8.py --data ../shared/data/isic2016-256 --out runs/int8 \
        --model paper=runs/paper-model2.onnx --model unet=runs/release/model-fp32.onnx \
        --recipe naive --recipe per-channel --recipe keep-ends
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from lesionseg.evaluation import evaluate_checkpoint
from lesionseg.metrics import paired_difference
from lesionseg.prediction import OnnxPredictor
from lesionseg.quantize import Int8Recipe, quantize_int8, recipe_dict, training_images

RECIPES = {
    "naive": Int8Recipe(per_channel=False),
    "per-channel": Int8Recipe(),
    "percentile": Int8Recipe(calibration="percentile"),
    "entropy": Int8Recipe(calibration="entropy"),
    "keep-ends": Int8Recipe(keep_float=("first_conv", "last_conv")),
    "keep-ends-resize": Int8Recipe(keep_float=("first_conv", "last_conv", "resize")),
    "keep-first": Int8Recipe(keep_float=("first_conv",)),
    "keep-last": Int8Recipe(keep_float=("last_conv",)),
    "qoperator": Int8Recipe(format="qoperator"),
    "per-channel-512": Int8Recipe(images=512),
    "keep-ends-512": Int8Recipe(images=512, keep_float=("first_conv", "last_conv")),
}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def test_scores(model: Path, data: str) -> tuple[float, dict[str, float]]:
    scored = evaluate_checkpoint(model, data, "test", out=None, source_resolution=True, progress=False)
    return scored["metrics_source_resolution"]["iou_per_image"], {r["id"]: r["iou_source"] for r in scored["per_image"]}


def paired_rates(first: OnnxPredictor, second: OnnxPredictor, size: int, rounds: int = 5) -> tuple[float, float]:
    """Batch-32 images/s of each, best of `rounds` alternating calls (so both see the same machine)."""
    batch = np.random.default_rng(0).integers(0, 256, (32, 3, size, size), dtype=np.uint8)
    best = [0.0, 0.0]
    for predictor in (first, second):
        predictor(batch)  # warm-up
    for _ in range(rounds):
        for n, predictor in enumerate((first, second)):
            start = time.perf_counter()
            predictor(batch)
            best[n] = max(best[n], 32 / (time.perf_counter() - start))
    return best[0], best[1]


def parse_model(text: str) -> tuple[str, Path]:
    label, _, path = text.partition("=")
    return label, Path(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="dataset: training split for calibration, test split for scores")
    parser.add_argument("--model", action="append", type=parse_model, required=True, help="LABEL=float32.onnx")
    parser.add_argument("--recipe", action="append", choices=RECIPES, help="default: all")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    results = {"cpu": cpu_name(), "data": args.data, "models": {}}
    for label, fp32 in args.model:
        reference = OnnxPredictor(fp32)
        fp32_iou, fp32_per_image = test_scores(fp32, args.data)
        rows = results["models"][label] = {"float32": {"path": str(fp32), "iou_per_image": fp32_iou}}
        for name in args.recipe or list(RECIPES):
            recipe = RECIPES[name]
            calibration = training_images(args.data, recipe.images, reference.image_size)
            int8 = quantize_int8(fp32, args.out / label / f"{name}.onnx", calibration, recipe)
            iou, per_image = test_scores(int8, args.data)
            fp32_rate, int8_rate = paired_rates(reference, OnnxPredictor(int8), reference.image_size, args.rounds)
            rows[name] = {"recipe": recipe_dict(recipe), "iou_per_image": iou, "minus_float32": paired_difference(per_image, fp32_per_image),
                          "float32_images_per_s": fp32_rate, "int8_images_per_s": int8_rate, "speedup": int8_rate / fp32_rate,
                          "bytes": int8.stat().st_size}
            print(f"{label} {name}: Jaccard {iou:.4f} ({iou - fp32_iou:+.4f} vs float32 {fp32_iou:.4f}), "
                  f"{int8_rate:.0f} vs {fp32_rate:.0f} img/s = {int8_rate / fp32_rate:.2f}x", flush=True)
            (args.out / "int8.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
