"""Rebuild the released model from scratch and print its metrics: one command.

    make release        # = .venv/bin/python tools/release.py --out runs/release \
        --weights ../shared/weights/mobilenet_v2_imagenet_from_keras_int8.pth --shared ../shared/data

Stages (a rerun resumes or skips what is done):
1. train: `lesionseg train` with RELEASE_ARGS on the isic2016-256 training split plus the extra folders;
   validation comes from the isic2016-256 training split only (seeded), so the test split is never seen.
2. export: ONNX with float32 weights, and with float16 weights (half the size, computed in float32).
3. score: both ONNX files on the isic2016-256 test split at the stored 256 px resolution, plain and with flip
   TTA + largest component + hole filling, per-image Jaccard with bootstrap 95 % intervals, worst decile;
   the float16 file ships only if its mean per-image Jaccard is within 0.003 of the float32 file's.
4. ship: the file into src/lesionseg/release/ with its metadata (version, data, fingerprint, weights, metrics,
   command, wall time), release.json beside it, and the ten worst test images as a figure for MODEL_CARD.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import bootstrap

from lesionseg.machine import device_name
from lesionseg.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "src" / "lesionseg" / "release" / "lesionseg-unet.onnx"
VERSION = "1"
EXTRA = ("isic2018-extra-256",)  # the extra folders that were measured to help (README, benchmarks/README.md)
RELEASE_ARGS = ["--preset", "unet-finetune", "--image-size", "128", "--epochs", "8", "--seed", "0"]
FP16_TOLERANCE = 0.003


def train(out: Path, shared: Path, weights: str) -> Path:
    run = out / "train"
    command = [sys.executable, "-m", "lesionseg", "train", "--no-progress"]
    if (run / "config.yaml").is_file():
        command += ["--resume", str(run)]
    else:
        command += [*RELEASE_ARGS, "--data", str(shared / "isic2016-256"), "--weights", weights, "--out", str(run)]
        for folder in EXTRA:
            command += ["--extra-data", str(shared / folder)]
    with open(out / "train.log", "a") as log:
        if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
            sys.exit(f"training failed; see {out / 'train.log'}")
    return run


def interval(values: list[float]) -> tuple[float, float]:
    result = bootstrap(
        (np.asarray(values),),
        np.mean,
        n_resamples=10_000,
        confidence_level=0.95,
        method="percentile",
        rng=np.random.default_rng(0),
    ).confidence_interval
    return float(result.low), float(result.high)


def score(model: Path, data: Path, out: Path) -> dict:
    """Test-split scores of an ONNX file at the stored resolution, plain and refined."""
    from lesionseg.evaluation import evaluate_checkpoint
    from lesionseg.metrics import REPORTED
    from lesionseg.pipeline import Refinements

    scores = {}
    for refine in (Refinements(), Refinements(tta=True, largest_component=True, fill_holes=True)):
        result = evaluate_checkpoint(
            model,
            data,
            "test",
            out / f"eval-{model.stem}-{refine.name}",
            refine,
            source_resolution=True,
            progress=False,
        )
        metrics = result["metrics_source_resolution"]
        per_image = [row["iou_source"] for row in result["per_image"]]
        low, high = interval(per_image)
        scores[refine.name] = {
            **{k: metrics[k] for k in REPORTED},
            "iou_ci95": [low, high],
            "images": result["images"],
            "worst": sorted(result["per_image"], key=lambda r: r["iou_source"])[:10],
        }
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/release"))
    parser.add_argument("--shared", type=Path, default=Path("../shared/data"), help="folder holding the data sets")
    parser.add_argument("--weights", required=True, help="the ImageNet MobileNetV2 state_dict the encoder starts from")
    parser.add_argument(
        "--stage",
        choices=("train", "all", "speed"),
        default="all",
        help="train: only train; speed: only time the shipped file (needs an idle machine)",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.stage == "speed":
        return speed(args.shared / "isic2016-256", args.out)
    run = train(args.out, args.shared, args.weights)
    if args.stage == "train":
        return
    ship(args, run, start)


def ship(args: argparse.Namespace, run: Path, start: float) -> None:
    from lesionseg.export import export_onnx

    info = RunDir(run).read_info()
    data = args.shared / "isic2016-256"
    files = {
        "float32": export_onnx(run / "best.pt", args.out / "model-fp32.onnx"),
        "float16": export_onnx(run / "best.pt", args.out / "model-fp16.onnx", fp16_weights=True),
    }
    scores = {kind: score(path, data, args.out) for kind, path in files.items()}
    gap = abs(scores["float16"]["plain"]["iou_per_image"] - scores["float32"]["plain"]["iou_per_image"])
    chosen = "float16" if gap <= FP16_TOLERANCE else "float32"
    release = {
        "version": VERSION,
        "file": SHIPPED.name,
        "weights_storage": chosen,
        "fp16_vs_fp32_jaccard_gap": gap,
        "bytes": files[chosen].stat().st_size,
        "training_args": RELEASE_ARGS,
        "extra_data": list(EXTRA),
        "training_data": ["isic2016-256 training split (less validation)", *EXTRA],
        "licence": "CC BY-NC 4.0 (ISIC 2018 Task 1 data): non-commercial, attribution",
        "data_fingerprint": info["data_fingerprint"],
        "encoder_weights": info.get("weights"),
        **RunDir(run).best_validation("val_iou"),
        "train_seconds": RunDir(run).epoch_seconds(),
        "device": device_name(),
        "scores": scores,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    metadata = {
        "release": VERSION,
        "training_data": ", ".join(release["training_data"]),
        "licence": release["licence"],
        "data_fingerprint": release["data_fingerprint"],
        "encoder_weights_sha256": str((release["encoder_weights"] or {}).get("sha256")),
        "test_jaccard": f"{scores[chosen]['plain']['iou_per_image']:.4f}",
        "metrics": json.dumps({k: {m: v for m, v in s.items() if m != "worst"} for k, s in scores[chosen].items()}),
    }
    final = export_onnx(
        run / "best.pt",
        args.out / "shipped.onnx",
        fp16_weights=chosen == "float16",
        metadata={**metadata, "name": f"lesionseg U-Net v{VERSION} (MobileNetV2, 128 px)", "version": f"v{VERSION}"},
    )
    SHIPPED.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(final, SHIPPED)
    release["invocation_seconds"] = time.perf_counter() - start  # this call only: training counts only if it trained
    (SHIPPED.parent / "release.json").write_text(json.dumps(release, indent=1))
    worst_figure(scores[chosen]["plain"]["worst"], final, data, ROOT / "docs" / "release_worst.png")
    print(json.dumps({k: {m: v for m, v in s["plain"].items() if m != "worst"} for k, s in scores.items()}, indent=1))
    print(f"shipped: {SHIPPED} ({release['bytes'] / 1e6:.1f} MB, {chosen} weights)")


def speed(data: Path, out: Path, repeats: int = 5) -> None:
    """`lesionseg predict` on every test image, end to end (a fresh process: start-up, decode, resize, model,
    upsample, two PNGs per image), beside the shipped model's own batch-32 throughput, in one run."""
    from lesionseg.predictors import OnnxPredictor

    images = sorted((data / "ISBI2016_ISIC_Part1_Test_Data").glob("*.jpg"))
    predictor = OnnxPredictor(SHIPPED)
    batch = np.random.default_rng(0).integers(
        0, 256, (32, 3, predictor.image_size, predictor.image_size), dtype=np.uint8
    )
    predictor(batch)
    model_rates = []
    for _ in range(repeats):
        begin = time.perf_counter()
        predictor(batch)
        model_rates.append(32 / (time.perf_counter() - begin))
    begin = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "lesionseg",
            "predict",
            str(data / "ISBI2016_ISIC_Part1_Test_Data"),
            "--out",
            str(out / "predict-test"),
            "--no-progress",
        ],
        check=True,
        capture_output=True,
    )
    end_to_end = len(images) / (time.perf_counter() - begin)
    result = {
        "device": device_name(),
        "images": len(images),
        "predict_images_per_s": end_to_end,
        "model_batch32_images_per_s": max(model_rates),
    }
    (out / "speed.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


def worst_figure(worst: list[dict], model: Path, data: Path, path: Path) -> None:
    """Image, ground truth and the shipped model's mask for the ten worst test images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lesionseg.api import load
    from lesionseg.data import find_pairs
    from lesionseg.images import inspect_mask

    segmenter = load(model)
    pairs = {pair.id: pair for pair in find_pairs(data, "test")[0]}
    fig, axes = plt.subplots(len(worst), 3, figsize=(7.5, 2.5 * len(worst)), squeeze=False)
    for row, item in enumerate(worst):
        pair = pairs[item["id"]]
        result = segmenter.segment(pair.image)
        panels = (plt.imread(pair.image), inspect_mask(pair.mask)[0], result.mask)
        for col, (panel, title) in enumerate(
            zip(panels, ("image", "ground truth", f"prediction, J={item['iou_source']:.2f}"))
        ):
            axes[row, col].imshow(panel, cmap=None if col == 0 else "gray")
            axes[row, col].set_title(f"{item['id']}: {title}" if col == 0 else title, fontsize=8)
            axes[row, col].axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    main()
