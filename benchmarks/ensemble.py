"""Score the mean of several models' probabilities as one model, on a run's validation images or the test split.

Members are run folders, .pt checkpoints or .onnx files (an ONNX file needs `--data`, and for `--split val` a
split.json beside it); they must share the input size, the threshold and, on validation, the same validation
images, since only images no member trained on tell whether an ensemble helps. Writes an evaluation folder
(metrics.json, per_image.csv) like `lesionseg evaluate --source-resolution --out`, so `benchmarks/paired.py`
pairs it with its members' folders.

    .venv/bin/python benchmarks/ensemble.py runs/release-v1/model.onnx runs/epochs12-seed0/12ep-seed0 \
        --data ../shared/data/isic2016-256 --split val --tta --out runs/ensembles/seed0-val-tta
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lesionseg.segment.pipeline import Refinements
from lesionseg.train.evaluation import (
    images_to_score,
    pipeline_for,
    probabilities_of,
    score_probabilities,
    write_evaluation,
)
from lesionseg.train.rundir import RunDir


def validation_ids(members: list[str]) -> list[str]:
    """The validation images every member held out; refuses members that held out different ones."""
    splits = [RunDir.of(m).read_split()["val"] for m in members]
    for member, split in zip(members[1:], splits[1:]):
        if split != splits[0]:
            sys.exit(
                f"{member}: held out other validation images than {members[0]}; an ensemble is scored on "
                "images no member trained on (train the members with the same --split-seed)"
            )
    return splits[0]


def ensemble_probabilities(members: list[str], data: str, split: str, refine: Refinements):
    """Each member's probabilities on the split, averaged; with the split's images and the shared settings."""
    if split == "val":
        validation_ids(members)
    total, cached, first = None, None, None
    for member in members:
        pipeline, scoring, _ = pipeline_for(member, data, refine)
        settings = (scoring.image_size, scoring.threshold)
        if first not in (None, settings):
            sys.exit(f"{member}: input size and threshold {settings} differ from the first member's {first}")
        first = first or settings
        if cached is None:
            cached, scored_by = images_to_score(member, split, scoring), pipeline
        probabilities = probabilities_of(pipeline, cached.images)
        total = probabilities if total is None else total + probabilities
    return total / len(members), cached, scored_by


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("members", nargs="+", help="run folders, .pt or .onnx files")
    parser.add_argument("--data", required=True, help="the dataset folder (isic2016-256)")
    parser.add_argument("--split", choices=("val", "test"), default="val")
    parser.add_argument("--tta", action="store_true", help="each member averages over flips first")
    parser.add_argument("--post", action="store_true", help="largest component and hole filling after averaging")
    parser.add_argument("--out", type=Path, required=True, help="evaluation folder to write")
    args = parser.parse_args()
    refine = Refinements(tta=args.tta, largest_component=args.post, fill_holes=args.post)
    probabilities, cached, pipeline = ensemble_probabilities(args.members, args.data, args.split, refine)
    result = {
        "members": args.members,
        "split": args.split,
        "images": len(cached),
        "refinements": refine.name,
        **score_probabilities(pipeline, probabilities, cached, args.data, args.split),
    }
    write_evaluation(result, args.out)
    print(
        f"{len(args.members)} members, {args.split}, {refine.name}: mean per-image Jaccard at the stored resolution "
        f"{result['metrics_source_resolution']['iou_per_image']:.4f} ({len(cached)} images) -> {args.out}"
    )


if __name__ == "__main__":
    main()
