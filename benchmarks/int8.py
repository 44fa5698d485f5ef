"""Which int8 recipe holds accuracy, and how fast is it? For each float32 model and each recipe: quantize
(calibrated on training images only, the run's validation images left out), score on those validation
images (what the default recipe is chosen on) and on the test split at the stored resolution (mean
per-image Jaccard, paired intervals against float32), and time batch-32 onnxruntime throughput against float32,
alternating the two in one process so the ratio holds on a busy or slower machine.

    .venv/bin/python benchmarks/int8.py --data ../shared/data/isic2016-256 --out runs/int8 \
        --model paper=runs/paper-model2.onnx:runs/paper-imagenet/model2-finetune/split.json \
        --model unet=runs/release/model-fp32.onnx:runs/release/train/split.json \
        --recipe naive --recipe per-channel --recipe keep-ends
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from common import jaccard, read_result, write_result
from lesionseg.images import inspect_mask, read_image
from lesionseg.segment.pipeline import Pipeline
from lesionseg.segment.predictors import OnnxPredictor
from lesionseg.train.data import find_pairs
from lesionseg.train.evaluation import evaluate_checkpoint
from lesionseg.train.metrics import paired_difference
from lesionseg.train.quantize import Int8Recipe, quantize_int8, training_images

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
    "percentile-512": Int8Recipe(calibration="percentile", images=512),
    "conv-only": Int8Recipe(op_types=("Conv",)),  # attention gates (Sigmoid, Mul), adds and resizes in float32
    "conv-add": Int8Recipe(op_types=("Conv", "Add")),
}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def test_scores(model: Path, data: str) -> tuple[float, dict[str, float]]:
    scored = evaluate_checkpoint(model, data, "test", out=None, source_resolution=True, progress=False)
    return scored["metrics_source_resolution"]["iou_per_image"], {r["id"]: r["iou_source"] for r in scored["per_image"]}


def validation_scores(model: Path, data: str, val_ids: set[str]) -> dict[str, float]:
    """Per-image Jaccard on the run's own validation images (what a recipe may be chosen on)."""
    pipeline = Pipeline(OnnxPredictor(model))
    pairs = [pair for pair in find_pairs(data, "train")[0] if pair.id in val_ids]
    return {
        pair.id: jaccard(pipeline.segment([read_image(pair.image)])[0].mask, inspect_mask(pair.mask)[0])
        for pair in pairs
    }


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


def parse_model(text: str) -> tuple[str, Path, Path]:
    label, _, paths = text.partition("=")
    model, _, split = paths.partition(":")
    return label, Path(model), Path(split)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="dataset: training split for calibration, test split for scores")
    parser.add_argument(
        "--model",
        action="append",
        type=parse_model,
        required=True,
        help="LABEL=float32.onnx:split.json (the split.json of the run it was trained in)",
    )
    parser.add_argument("--recipe", action="append", choices=RECIPES, help="default: all")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    summary = args.out / "int8.json"  # a later run adds its recipes to those already measured
    results = read_result(summary) if summary.is_file() else {"cpu": cpu_name(), "data": args.data, "models": {}}
    for label, fp32, split in args.model:
        reference = OnnxPredictor(fp32)
        val_ids = set(json.loads(split.read_text())["val"])
        fp32_val = validation_scores(fp32, args.data, val_ids)
        fp32_iou, fp32_per_image = test_scores(fp32, args.data)
        rows = results["models"].setdefault(label, {})
        rows["float32"] = {
            "path": str(fp32),
            "iou_per_image": fp32_iou,
            "val_iou": float(np.mean(list(fp32_val.values()))),
        }
        for name in args.recipe or list(RECIPES):
            recipe = RECIPES[name]
            calibration = training_images(args.data, recipe.images, reference.image_size, exclude=frozenset(val_ids))
            int8 = quantize_int8(fp32, args.out / label / f"{name}.onnx", calibration, recipe)
            val = paired_difference(validation_scores(int8, args.data, val_ids), fp32_val)
            iou, per_image = test_scores(int8, args.data)
            fp32_rate, int8_rate = paired_rates(reference, OnnxPredictor(int8), reference.image_size, args.rounds)
            rows[name] = {
                "recipe": asdict(recipe),
                "val_minus_float32": val,
                "iou_per_image": iou,
                "minus_float32": paired_difference(per_image, fp32_per_image),
                "float32_images_per_s": fp32_rate,
                "int8_images_per_s": int8_rate,
                "speedup": int8_rate / fp32_rate,
                "bytes": int8.stat().st_size,
            }
            print(
                f"{label} {name}: validation {val['mean']:+.4f}; test Jaccard {iou:.4f} ({iou - fp32_iou:+.4f} vs float32 "
                f"{fp32_iou:.4f}), {int8_rate:.0f} vs {fp32_rate:.0f} img/s = {int8_rate / fp32_rate:.2f}x",
                flush=True,
            )
            write_result(summary, results)


if __name__ == "__main__":
    main()
