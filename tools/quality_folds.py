"""Out-of-fold predictions over the ISIC training images, for fitting the quality estimate on ISIC-like images.

The release model's own validation split holds only 81 ISIC images; the external HAM10000 set is from other
clinics. Here the ISIC 2016 training split and the ISIC 2018 extra pairs are cut into K folds (a stable split by
image id); for each fold a model is trained on the other K-1 folds with the release recipe less HAM10000 (which
would multiply the cost by five), and `evaluate --source-resolution` scores it on the fold it never saw. Each
fold's per_image.csv then holds the quality features and the true Jaccard of images no model that made them was
trained on: rows the estimate can be fitted on (`lesionseg.train.qualityfit`). No test image is used anywhere.

    .venv/bin/python tools/quality_folds.py --shared ../shared/data --weights W.pth --out runs/quality-folds [--folds 5]

A rerun resumes: a fold whose evaluation exists is skipped, a fold whose training stopped resumes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from lesionseg.segment.outputs import share_of as fold_of  # a stable split by image id, as predict's shards
from lesionseg.train.data import find_pairs

FOLD_ARGS = [
    "--preset", "unet-finetune", "--image-size", "128", "--epochs", "6", "--seed", "0", "--colour", "0.2", "--scale", "0.2"
]  # fmt: skip
SOURCES = (("isic2016-256", "train"), ("isic2018-extra-256", "train"))


def link_fold(shared: Path, folder: Path, fold: int, folds: int) -> int:
    """folder/train (every other fold) and folder/test (this fold), as links to the shared pairs; returns the
    number of held-out images."""
    held_out = 0
    for source, split in SOURCES:
        for pair in find_pairs(shared / source, split)[0]:
            part = "test" if fold_of(pair.image.stem, folds) == fold else "train"
            held_out += part == "test"
            for kind, path in (("images", pair.image), ("masks", pair.mask)):
                link = folder / part / kind / path.name
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.exists():
                    link.symlink_to(path.resolve())
    return held_out


def train_fold(data: Path, run: Path, weights: str) -> None:
    command = [sys.executable, "-m", "lesionseg", "train", "--no-progress"]
    if (run / "config.yaml").is_file():
        command += ["--resume", str(run)]
    else:
        command += [*FOLD_ARGS, "--data", str(data), "--weights", weights, "--out", str(run)]
    with open(run.parent / "train.log", "a") as log:
        if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
            sys.exit(f"training failed; see {run.parent / 'train.log'}")


def out_of_fold(shared: Path, weights: str, out: Path, folds: int) -> list[Path]:
    """Each fold's evaluate folder (per_image.csv of the images its model never saw), made if missing."""
    from lesionseg.train.evaluation import evaluate_checkpoint

    evaluations = []
    for fold in range(folds):
        folder = out / f"fold{fold + 1}-of-{folds}"
        evaluations.append(folder / "eval")
        if (evaluations[-1] / "per_image.csv").is_file():
            continue
        held_out = link_fold(shared, folder / "data", fold, folds)
        print(f"fold {fold + 1}/{folds}: {held_out} images held out", flush=True)
        train_fold(folder / "data", folder / "train", weights)
        evaluate_checkpoint(
            folder / "train", folder / "data", "test", evaluations[-1], source_resolution=True, progress=False
        )
    return evaluations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=Path("../shared/data"))
    parser.add_argument("--weights", required=True, help="ImageNet MobileNetV2 weights, as the release uses")
    parser.add_argument("--out", type=Path, default=Path("runs/quality-folds"))
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()
    for folder in out_of_fold(args.shared, args.weights, args.out, args.folds):
        print(folder / "per_image.csv")


if __name__ == "__main__":
    main()
