"""`lesionseg predict` end to end against the model alone, in one run, alternating.

Three folders: (a) the ISIC 2016 test JPEGs at 256 px (from --data), (b) 200 synthetic 765x572 PNGs,
(c) 100 synthetic 1504x1129 JPEGs. For each, images/s of `run_predict` with default options (masks and rows,
no overlays) and of the model alone on the same images already at the model's size, batch 32; rounds
alternate the two, and the ratio is of medians. glibc's thresholds are set as `lesionseg predict` sets them. Target (issue "Segment an archive"): predict >= 80 % of the
model alone.

    .venv/bin/python benchmarks/predict_speed.py --data ../shared/data/isic2016-256 [--rounds 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from common import default_out, write_result
from lesionseg.api import load_predictor
from lesionseg.segment.pipeline import Pipeline, model_input, read_for_model
from lesionseg.segment.prediction import run_predict
from lesionseg.train.allocator import bound_memory_and_reuse_it


def synthetic(folder: Path, count: int, size: tuple[int, int], suffix: str) -> Path:
    """Skin-toned noise with a dark disc, saved as a camera would (JPEG quality 90) or as PNG."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    width, height = size
    yy, xx = np.ogrid[:height, :width]
    for n in range(count):
        pixels = rng.normal((200, 160, 140), 12, (height, width, 3))
        disc = (yy - height * rng.uniform(0.4, 0.6)) ** 2 + (xx - width * rng.uniform(0.4, 0.6)) ** 2
        pixels[disc < (min(size) * rng.uniform(0.15, 0.3)) ** 2] *= 0.45
        image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
        image.save(folder / f"img{n:04d}{suffix}", **({"quality": 90} if suffix == ".jpg" else {}))
    return folder


def model_alone(pipeline: Pipeline, batch: np.ndarray) -> float:
    start = time.perf_counter()
    for first in range(0, len(batch), 32):
        pipeline.probabilities(batch[first : first + 32])
    return len(batch) / (time.perf_counter() - start)


def end_to_end(pipeline: Pipeline, folder: Path, scratch: Path) -> float:
    out = scratch / "out"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    report = run_predict(pipeline, [folder], out, batch_size=32, progress=False)
    seconds = time.perf_counter() - start
    return len(report.rows) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="an ISIC 2016 folder (its test JPEGs are set (a))")
    parser.add_argument("--onnx", help="the model (default: the released one)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=default_out("predict-speed"))
    args = parser.parse_args()
    bound_memory_and_reuse_it()  # as the command does
    pipeline = Pipeline(load_predictor(onnx=args.onnx))
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        folders = {
            "isic2016-test-256px-jpeg": Path(args.data) / "ISBI2016_ISIC_Part1_Test_Data",
            "synthetic-765x572-png": synthetic(scratch / "png", 200, (765, 572), ".png"),
            "synthetic-1504x1129-jpeg": synthetic(scratch / "jpeg", 100, (1504, 1129), ".jpg"),
        }
        for name, folder in folders.items():
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".png"))
            size = pipeline.image_size
            batch = np.stack([model_input(read_for_model(p, str(p), size)[0], size) for p in files])
            alone, predict = [], []
            for _ in range(args.rounds):
                alone.append(model_alone(pipeline, batch))
                predict.append(end_to_end(pipeline, folder, scratch))
            results[name] = {
                "images": len(files),
                "model_alone_images_per_s": [round(v, 1) for v in alone],
                "predict_images_per_s": [round(v, 1) for v in predict],
                "predict_over_model": round(statistics.median(predict) / statistics.median(alone), 3),
            }
            print(name, results[name], flush=True)
    print(write_result(args.out, {"model": pipeline.name, "version": pipeline.version, "folders": results}))


if __name__ == "__main__":
    main()
