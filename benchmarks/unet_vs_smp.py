"""Our U-Net against smp's Unet("mobilenet_v2"): same data, loss, schedule, epochs, seed.

Trains both with the `unet-finetune` preset (overridable), scores each best checkpoint (picked by
validation IoU, never the test split) on the test split, plain and with each inference refinement,
at the model's resolution and at the stored resolution of the test masks, and reports the ratio
ours / smp of mean per-image Jaccard. With `--parallel` the two trainings run at once, each on half
the CPU cores (on 2 cores that is faster than one after the other).

    .venv/bin/python benchmarks/unet_vs_smp.py --data ../shared/data/isic2016-256 \
        --extra-data ../shared/data/isic2018-extra-256 --out runs/unet-vs-smp-extra --epochs 12 \
        --no-pretrained --parallel          # or --weights ../shared/weights/mobilenet_v2_imagenet_from_keras_int8.pth
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

from common import epoch_seconds, read_result, write_result
from lesionseg.machine import device_name
from lesionseg.train.config import build_config
from lesionseg.train.evaluation import Refinements, evaluate_checkpoint, read_per_image
from lesionseg.train.metrics import REPORTED, paired_difference
from lesionseg.train.reproduce import run_compare

ARCHS = ("unet", "smp-unet")
REFINEMENTS = (
    Refinements(),
    Refinements(tta=True),
    Refinements(largest_component=True, fill_holes=True),
    Refinements(tta=True, largest_component=True, fill_holes=True),
)
SCORES = REPORTED


def train_command(args: argparse.Namespace, arch: str, out: Path) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "lesionseg",
        "train",
        "--overwrite",  # a benchmark retrains on purpose
        "--preset",
        "unet-finetune",
        "--arch",
        arch,
        "--data",
        args.data,
        "--out",
        str(out),
        "--epochs",
        str(args.epochs),
        "--image-size",
        str(args.image_size),
        "--seed",
        str(args.seed),
        "--no-progress",
    ]
    for folder in args.extra_data:
        command += ["--extra-data", folder]
    if arch == "unet" and args.decoder_attention:
        command += ["--decoder-attention", args.decoder_attention]
    return command + encoder_start(args)


def encoder_start(args: argparse.Namespace) -> list[str]:
    """How both encoders start: from scratch, from a named ImageNet file, or from lesionseg's weight lookup."""
    if args.no_pretrained:
        return ["--no-pretrained"]
    return ["--weights", args.weights] if args.weights else []


def train_all(args: argparse.Namespace, out: Path) -> dict[str, float]:
    """Train every arch not yet trained (at once with --parallel); the seconds each spent in its epochs
    (log.csv). A failed run stops the benchmark."""
    threads = max(1, (os.cpu_count() or 2) // (len(ARCHS) if args.parallel else 1))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    running = {}
    for arch in ARCHS:
        if finished(out / arch, args.epochs):  # rerunning the script only rescores
            continue
        (out / arch).mkdir(parents=True, exist_ok=True)
        with open(out / f"{arch}.log", "w") as log:
            running[arch] = subprocess.Popen(
                train_command(args, arch, out / arch), env=env, stdout=log, stderr=subprocess.STDOUT
            )
        if not args.parallel:
            running[arch].wait()
    for arch, process in running.items():
        if process.wait() != 0:
            sys.exit(f"training {arch} failed (exit {process.returncode}); see {out / (arch + '.log')}")
    return {arch: epoch_seconds(out / arch) for arch in ARCHS}


def finished(run: Path, epochs: int) -> bool:
    """True when the run has its best checkpoint and ended: every epoch logged, or stopped early by
    the preset's patience (the same rule training uses), so a rerun never trains it over."""
    if not (run / "best.pt").is_file() or not (run / "log.csv").is_file():
        return False
    with open(run / "log.csv", newline="") as handle:
        scores = [float(row["val_iou"]) for row in csv.DictReader(handle)]
    patience = build_config("unet-finetune").patience
    best_epoch = scores.index(max(scores)) + 1 if scores else 0
    return len(scores) >= epochs or bool(patience and len(scores) - best_epoch >= patience)


def per_image_jaccard(run: Path, refinement: str = "plain", column: str = "iou_source") -> dict[str, float]:
    """Per-image test Jaccard of a scored run (default: plain, at the stored resolution)."""
    where = run / ("eval" if refinement == "plain" else f"eval-{refinement}")
    return {row["id"]: row[column] for row in read_per_image(where)}


def wall_seconds(out: Path, start: float, rescore_only: bool) -> dict[str, float]:
    """The benchmark's wall time. A rerun that only rescores keeps the wall time of the run that trained
    (from the earlier summary) and reports its own time apart, so the summary never understates the cost."""
    elapsed = time.perf_counter() - start
    earlier = out / "unet_vs_smp.json"
    if rescore_only and earlier.is_file() and "wall_seconds" in (previous := read_result(earlier)):
        return {"wall_seconds": previous["wall_seconds"], "rescore_seconds": elapsed}
    return {"wall_seconds": elapsed}


def score(run: Path) -> dict[str, dict[str, dict[str, float]]]:
    """Test-split scores of the run's best checkpoint, per refinement, at model and at stored resolution."""
    scores = {}
    for refine in REFINEMENTS:
        where = run / ("eval" if refine == Refinements() else f"eval-{refine.name}")
        result = evaluate_checkpoint(
            run / "best.pt", split="test", out=where, refine=refine, source_resolution=True, progress=False
        )
        scores[refine.name] = {
            resolution: {k: result[key][k] for k in SCORES}
            for resolution, key in (("model", "metrics"), ("stored", "metrics_source_resolution"))
        }
    return scores


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--extra-data", action="append", default=[], metavar="DIR", help="added to training only")
    parser.add_argument("--out", default="runs/unet-vs-smp")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--no-pretrained", action="store_true", help="both encoders from scratch")
    start.add_argument(
        "--weights", metavar="FILE", help="both encoders from this ImageNet state_dict (default: lesionseg's lookup)"
    )
    parser.add_argument("--decoder-attention", choices=("none", "scse"), help="ours only (default: the preset's, scse)")
    parser.add_argument("--parallel", action="store_true", help="train both at once, each on half the cores")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    start = time.perf_counter()
    rescore_only = all(finished(out / arch, args.epochs) for arch in ARCHS)
    seconds = train_all(args, out)
    results = {
        arch: {"train_seconds": seconds[arch], "epochs": args.epochs, "scores": score(out / arch)} for arch in ARCHS
    }
    ratio = {
        resolution: results["unet"]["scores"]["plain"][resolution]["iou_per_image"]
        / results["smp-unet"]["scores"]["plain"][resolution]["iou_per_image"]
        for resolution in ("model", "stored")
    }
    config = build_config(
        "unet-finetune",
        data=args.data,
        extra_data=args.extra_data,
        epochs=args.epochs,
        decoder_attention=args.decoder_attention,
        image_size=args.image_size,
        seed=args.seed,
        weights="none" if args.no_pretrained else args.weights or "imagenet",
    )
    summary = {
        "device": device_name(),
        "parallel": args.parallel,
        **wall_seconds(out, start, rescore_only),
        "command": " ".join(sys.argv),
        "config": config.to_dict(),
        "results": results,
        "iou_ratio_ours_over_smp": ratio,
        "paired_difference_stored_plain": paired_difference(
            per_image_jaccard(out / "unet"), per_image_jaccard(out / "smp-unet")
        ),
    }
    write_result(out / "unet_vs_smp.json", summary)
    run_compare([out / arch for arch in ARCHS], out / "compare", progress=False)
    for arch, r in results.items():
        for name, s in r["scores"].items():
            for resolution, v in s.items():
                print(
                    f"{arch:9s} {name:45s} {resolution:6s} IoU {v['iou_per_image']:.4f}  Dice {v['dice_per_image']:.4f}  "
                    f"thresholded {v['thresholded_iou_per_image']:.4f}  worst decile {v['iou_worst_decile']:.4f}"
                )
    print(
        f"ratio ours/smp (plain mean per-image Jaccard): model resolution {ratio['model']:.4f}, stored {ratio['stored']:.4f}"
    )
    d = summary["paired_difference_stored_plain"]
    print(
        f"ours - smp, stored, plain: {d['mean']:+.4f} (paired bootstrap 95 % interval {d['ci95_low']:+.4f} to "
        f"{d['ci95_high']:+.4f}); ours better on {d['ours_better']} images, smp on {d['theirs_better']}"
    )


if __name__ == "__main__":
    main()
