"""Rebuild the released model from scratch and print its metrics: one command.

    make release        # = .venv/bin/python tools/release.py --out runs/release \
        --weights ../shared/weights/mobilenet_v2_imagenet_from_keras_int8.pth --shared ../shared/data

Stages (a rerun resumes or skips what is done):
1. train: `lesionseg train` with RELEASE_ARGS on the isic2016-256 training split plus the extra folders and
   HAM10000 less its external validation images; validation comes from the isic2016-256 training split only
   (seeded), so the test split is never seen.
2. export: ONNX with float32 weights, and with float16 weights (half the size, computed in float32).
3. score: both ONNX files on the isic2016-256 test split at the stored 256 px resolution, plain and with flip
   TTA + largest component + hole filling, per-image Jaccard with bootstrap 95 % intervals, worst decile;
   the float16 file ships only if its mean per-image Jaccard is within 0.003 of the float32 file's.
4. quality: the per-image quality estimate fitted on validation images only (the run's own and the external
   HAM10000 validation set, `tools/external_split.py`), embedded in the file, measured once on test.
5. int8: the same checkpoint quantized (`export --int8`'s recipe), with the same metadata and estimate, scored.
6. ship: both files into src/lesionseg/release/ with their metadata (version, data, fingerprint, weights, metrics,
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
from lesionseg.segment.quality import QualityModel
from lesionseg.train.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "src" / "lesionseg" / "segment" / "release" / "lesionseg-unet.onnx"
SHIPPED_INT8 = SHIPPED.with_name("lesionseg-unet-int8.onnx")  # `--precision int8`
VERSION = "3"
EXTRA = ("isic2018-extra-256",)  # the extra folders that were measured to help (README, benchmarks/README.md)
# and HAM10000 less its external validation images (tools/external_split.py), with colour and zoom augmentation,
# 8 epochs: chosen on the two validation sets (docs/experiments.md, "Release v2" and "Release v3")
RELEASE_ARGS = [
    "--preset", "unet-finetune", "--image-size", "128", "--epochs", "8", "--seed", "0", "--colour", "0.2", "--scale", "0.2"
]  # fmt: skip
FP16_TOLERANCE = 0.003
CLICKS_FILE = "lesionseg-clicks.onnx"  # the click model, shipped beside the release (`--stage clicks`)


def external_split(shared: Path, out: Path) -> Path:
    """out/ham10000-split: HAM10000's external validation images (external/test) and the rest (train), as links."""
    from external_split import SPLIT, link

    link(shared / "ham10000-200", out / "ham10000-split", set(json.loads(SPLIT.read_text())["ids"]))
    return out / "ham10000-split"


def train(out: Path, shared: Path, weights: str) -> Path:
    run = out / "train"
    command = [sys.executable, "-m", "lesionseg", "train", "--no-progress"]
    if (run / "config.yaml").is_file():
        command += ["--resume", str(run)]
    else:
        command += [*RELEASE_ARGS, "--data", str(shared / "isic2016-256"), "--weights", weights, "--out", str(run)]
        for folder in EXTRA:
            command += ["--extra-data", str(shared / folder)]
        command += ["--extra-data", str(external_split(shared, out) / "train")]
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
    from lesionseg.segment.pipeline import Refinements
    from lesionseg.train.evaluation import evaluate_checkpoint
    from lesionseg.train.metrics import REPORTED

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


def weights_record(weights: dict | None) -> dict | None:
    """The encoder's weights by file name and hash: the build machine's path says nothing to anyone else."""
    if not weights or not weights.get("source"):
        return weights
    return {k: v for k, v in weights.items() if k != "source"} | {"name": Path(weights["source"]).name}


def fit_quality(model: Path, split: Path, shared: Path, out: Path) -> tuple[Path, QualityModel, dict]:
    """The quality estimate, fitted on validation images only (the run's own 81, in `split`, and the external
    validation set) by `qualityfit.refit`, embedded in a copy of `model`; measured out of fold, then once on test."""
    from lesionseg.train.evaluation import evaluate_checkpoint
    from lesionseg.train.qualityfit import refit, risk_coverage_figure

    beside = out / "quality"
    beside.mkdir(parents=True, exist_ok=True)
    shutil.copy(split, beside / "split.json")  # evaluate --split val reads the split beside the model
    shutil.copy(model, beside / "model.onnx")
    sets = {
        "isic-val": (shared / "isic2016-256", "val"),
        "ham10000-external": (external_split(shared, out) / "external", "test"),
    }
    fitted = refit(beside / "model.onnx", sets, beside)
    shipped = Path(shutil.copy(fitted.model, out / f"{model.stem}-quality.onnx"))
    test = evaluate_checkpoint(
        shipped, shared / "isic2016-256", "test", beside / "eval-test", source_resolution=True, progress=False
    )
    truth = [row["iou_source"] for row in test["per_image"]]
    curves = {
        "ISIC test (339)": ([row["quality"] for row in test["per_image"]], truth),
        f"validation, out of fold ({len(fitted.truth)})": (fitted.out_of_fold, fitted.truth),
    }
    risk_coverage_figure(curves, ROOT / "docs" / "quality_risk_coverage.png")
    return shipped, fitted.estimate, fitted.report | {"test": test["quality"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/release"))
    parser.add_argument("--shared", type=Path, default=Path("../shared/data"), help="folder holding the data sets")
    parser.add_argument("--weights", required=True, help="the ImageNet MobileNetV2 state_dict the encoder starts from")
    parser.add_argument(
        "--stage",
        choices=("train", "all", "speed", "quality", "clicks"),
        default="all",
        help="train: only train; speed: only time the shipped file (needs an idle machine); quality: refit the "
        "shipped file's quality estimate (validation images of --split-from); clicks: ship --clicks as the click "
        "model, its --clicks-scores in release.json",
    )
    parser.add_argument("--clicks", type=Path, help="with --stage clicks: the click model (a train-clicks clicks.onnx)")
    parser.add_argument(
        "--clicks-scores", type=Path, nargs="*", default=[], help="benchmarks/clicks.py results of that file"
    )
    parser.add_argument(
        "--split-from",
        type=Path,
        help="with --stage quality: the split.json of the shipped run (its validation images)",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.stage == "speed":
        return speed(args.shared / "isic2016-256", args.out)
    if args.stage == "quality":
        return refit_shipped_quality(args)
    if args.stage == "clicks":
        return ship_clicks(args.clicks, args.clicks_scores)
    run = train(args.out, args.shared, args.weights)
    if args.stage == "train":
        return
    ship(args, run, start)


def ship(args: argparse.Namespace, run: Path, start: float) -> None:
    from lesionseg.train.export import export_onnx

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
        "training_args": RELEASE_ARGS,
        "extra_data": list(EXTRA),
        "training_data": [
            "isic2016-256 training split (less validation)",
            *EXTRA,
            "ham10000-200 less the 1,000 external validation images",
        ],
        "licence": "CC BY-NC 4.0 (ISIC 2018 Task 1 data): non-commercial, attribution",
        "data_fingerprint": info["data_fingerprint"],
        "encoder_weights": weights_record(info.get("weights")),
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
    final, estimate, release["quality"] = fit_quality(final, run / "split.json", args.shared, args.out)
    release["bytes"] = final.stat().st_size  # the shipped file: weights, metadata and the quality estimate
    about = {k: v for k, v in metadata.items() if k not in ("test_jaccard", "metrics")}  # the float file's scores
    int8 = ship_int8(run, about | {"name": f"lesionseg U-Net v{VERSION}", "version": f"v{VERSION}"}, estimate, args)
    release["int8"] = {"bytes": int8.stat().st_size, "scores": score(int8, data, args.out)}
    SHIPPED.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(final, SHIPPED)
    shutil.copy(int8, SHIPPED_INT8)
    release["invocation_seconds"] = time.perf_counter() - start  # this call only: training counts only if it trained
    (SHIPPED.parent / "release.json").write_text(json.dumps(release, indent=1))
    worst_figure(scores[chosen]["plain"]["worst"], final, data, ROOT / "docs" / "release_worst.png")
    print(json.dumps({k: {m: v for m, v in s["plain"].items() if m != "worst"} for k, s in scores.items()}, indent=1))
    print(f"shipped: {SHIPPED} ({release['bytes'] / 1e6:.1f} MB, {chosen} weights)")


def ship_int8(run: Path, metadata: dict[str, str], estimate: QualityModel, args: argparse.Namespace) -> Path:
    """The int8 file (`export --int8`'s default recipe, calibrated on training images) with the shipped file's
    metadata and quality estimate."""
    from lesionseg.train.export import export_int8
    from lesionseg.train.qualityfit import embed

    int8 = export_int8(run / "best.pt", args.out / "model-int8.onnx", metadata=metadata)
    return embed(int8, estimate, args.out / "model-int8-quality.onnx")


def refit_shipped_quality(args: argparse.Namespace) -> None:
    """The shipped file with a newly fitted quality estimate, and its figures in release.json."""
    if args.split_from is None:
        sys.exit("--stage quality needs --split-from RUN/split.json (the shipped run's validation images)")
    fitted, _, report = fit_quality(SHIPPED, args.split_from, args.shared, args.out)
    shutil.copy(fitted, SHIPPED)
    command = " ".join([Path(sys.executable).name, *sys.argv])
    recorded(quality=report | {"command": command}, bytes=SHIPPED.stat().st_size)  # a new estimate, a new size
    print(json.dumps(report, indent=1))


def recorded(**fields) -> None:
    """release.json beside the shipped file with `fields` set and the rest kept, replaced in one rename (a killed
    run leaves the old record, never half of one)."""
    from lesionseg.files import write_atomically

    path = SHIPPED.parent / "release.json"
    release = json.loads(path.read_text()) | fields
    write_atomically(path, lambda handle: handle.write(json.dumps(release, indent=1).encode()), "release record")


def ship_clicks(model: Path | None, results: list[Path]) -> None:
    """The click model into the package beside the release, and what it is and scored in release.json["clicks"]:
    the benchmark files must be of this very file (their recorded model's sha256)."""
    from lesionseg.files import sha256_of
    from lesionseg.segment.clicks import ClickModel

    if model is None or not model.is_file():
        sys.exit("--stage clicks needs --clicks RUN/clicks.onnx")
    digest, scores = sha256_of(model), {}
    for path in results:
        result = json.loads(path.read_text())
        if result["results"]["model"].get("sha256") != digest:
            sys.exit(f"{path}: scored another click model than {model}")
        scores[path.stem] = {
            "command": result["command"],
            "date": result["date"],
            "machine": result["machine"]["device"],
        }
        scores[path.stem] |= result["results"]["summary"]
    shipped = SHIPPED.with_name(CLICKS_FILE)
    shutil.copy(model, shipped)
    version = ClickModel(shipped).version  # "step N, lesionseg X" from train-clicks: the step it was exported at
    steps = f" --steps {version.split(',')[0].removeprefix('step ')}" if version.startswith("step ") else ""
    clicks = {
        "file": CLICKS_FILE,
        "bytes": shipped.stat().st_size,
        "sha256": digest,
        "version": version,
        "training": f"lesionseg train-clicks --data isic2016-256 isic2018-extra-256 ham10000-split/train{steps}",
        "scores": scores,
    }
    recorded(clicks=clicks)
    print(json.dumps(clicks, indent=1))


def speed(data: Path, out: Path, repeats: int = 5) -> None:
    """`lesionseg predict` on every test image, end to end (a fresh process: start-up, decode, resize, model,
    upsample, two PNGs per image), beside the shipped model's own batch-32 throughput, in one run."""
    from lesionseg.segment.predictors import OnnxPredictor

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
    from lesionseg.images import inspect_mask
    from lesionseg.train.data import find_pairs

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
