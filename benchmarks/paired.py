"""Paired per-image differences between scored runs, each against the first, from their evaluation folders.

Any folder `lesionseg evaluate --source-resolution --out DIR` (or variants.py, refinements of a run) wrote will
do, whatever model it scored: a checkpoint, an exported or shipped `.onnx`. The gap is in per-image Jaccard at
the stored resolution by default, with a paired bootstrap 95 % interval (`lesionseg.train.metrics.paired_difference`).
A comma-separated list of folders is one entry scored over several seeds: its per-image scores are averaged over
the seeds before pairing, and the entry's mean is reported per seed, with their spread and the ratio to the first.

    .venv/bin/python benchmarks/paired.py release-v1=runs/release-v1/eval 192px-6ep=runs/size192/192px-6ep/eval \
        --out benchmarks/results/paired/cpu-budget-paired.json
    .venv/bin/python benchmarks/paired.py ours=runs/a/seed0/eval,runs/a/seed1/eval smp=runs/b/seed0/eval,runs/b/seed1/eval
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from common import write_result
from lesionseg.train.evaluation import read_per_image
from lesionseg.train.metrics import paired_difference


def labelled(text: str) -> tuple[str, list[Path]]:
    label, _, folders = text.rpartition("=")
    return label or folders, [Path(folder) for folder in folders.split(",")]


def per_seed_scores(group: list[Path], column: str) -> list[dict[str, float]]:
    """Each folder's per-image `column`; refuses folders of one entry that scored other images."""
    runs = [{row["id"]: row[column] for row in read_per_image(folder)} for folder in group]
    for folder, run in zip(group[1:], runs[1:]):
        if set(run) != set(runs[0]):
            sys.exit(f"{folder}: scored other images than {group[0]}; seeds are averaged over the same images")
    return runs


def seed_means(folders: list[tuple[str, list[Path]]], column: str = "iou_source") -> dict[str, dict]:
    """Each entry's mean of `column` per folder (seed), with the mean and sample spread over its folders."""
    result = {}
    for label, group in folders:
        means = [float(np.mean(list(run.values()))) for run in per_seed_scores(group, column)]
        result[label] = {
            "per_folder": means,
            "mean": float(np.mean(means)),
            "sd": float(np.std(means, ddof=1)) if len(means) > 1 else 0.0,
        }
    return result


def differences(folders: list[tuple[str, list[Path]]], column: str = "iou_source") -> dict[str, dict[str, float]]:
    """Each entry's per-image `column` (averaged over its folders) minus the first entry's, over the same images."""
    scores = {}
    for label, group in folders:
        runs = per_seed_scores(group, column)
        scores[label] = {image: float(np.mean([run[image] for run in runs])) for image in runs[0]}
    (base, first), *others = scores.items()
    return {
        f"{label} - {base}": {
            **paired_difference(values, first),
            "ratio": float(np.mean(list(values.values())) / np.mean(list(first.values()))),
        }
        for label, values in others
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "folders",
        nargs="+",
        type=labelled,
        help="[LABEL=]EVAL_DIR[,EVAL_DIR...] with per_image.csv, one folder per seed; the first entry is the base",
    )
    parser.add_argument("--column", default="iou_source", help="per_image.csv column (iou: at the model's resolution)")
    parser.add_argument("--out", type=Path, help="write the JSON here")
    args = parser.parse_args()
    means = seed_means(args.folders, args.column)
    result = differences(args.folders, args.column)
    for label, m in means.items():
        print(
            f"{label}: {m['mean']:.4f}"
            + (f" ± {m['sd']:.4f} over {len(m['per_folder'])}" if len(m["per_folder"]) > 1 else "")
        )
    for name, d in result.items():
        print(
            f"{name}: {d['mean']:+.4f} ({d['ci95_low']:+.4f} to {d['ci95_high']:+.4f}), "
            f"{d['ours_better']} better, {d['theirs_better']} worse of {d['images']}, ratio {d['ratio']:.4f}"
        )
    if args.out:
        write_result(
            args.out,
            {
                "column": args.column,
                "folders": {label: ",".join(map(str, f)) for label, f in args.folders},
                "means": means,
                "pairs": result,
            },
        )


if __name__ == "__main__":
    main()
