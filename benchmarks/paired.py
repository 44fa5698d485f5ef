"""Paired per-image differences between scored runs, each against the first, from their evaluation folders.

Any folder `lesionseg evaluate --source-resolution --out DIR` (or variants.py, refinements of a run) wrote will
do, whatever model it scored: a checkpoint, an exported or shipped `.onnx`. The gap is in per-image Jaccard at
the stored resolution by default, with a paired bootstrap 95 % interval (`lesionseg.metrics.paired_difference`).

    .venv/bin/python benchmarks/paired.py release-v1=runs/release-v1/eval 192px-6ep=runs/size192/192px-6ep/eval \
        --out benchmarks/results/cpu-budget-paired.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lesionseg.evaluation import read_per_image
from lesionseg.metrics import paired_difference


def labelled(text: str) -> tuple[str, Path]:
    label, _, folder = text.rpartition("=")
    return label or folder, Path(folder)


def differences(folders: list[tuple[str, Path]], column: str = "iou_source") -> dict[str, dict[str, float]]:
    """Each folder's per-image `column` minus the first folder's, over the same images."""
    scores = {label: {row["id"]: row[column] for row in read_per_image(folder)} for label, folder in folders}
    (base, first), *others = scores.items()
    return {f"{label} - {base}": paired_difference(values, first) for label, values in others}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=labelled, help="[LABEL=]EVAL_DIR with per_image.csv; the first is the base")
    parser.add_argument("--column", default="iou_source", help="per_image.csv column (iou: at the model's resolution)")
    parser.add_argument("--out", type=Path, help="write the JSON here")
    args = parser.parse_args()
    result = differences(args.folders, args.column)
    for name, d in result.items():
        print(f"{name}: {d['mean']:+.4f} ({d['ci95_low']:+.4f} to {d['ci95_high']:+.4f}), "
              f"{d['ours_better']} better, {d['theirs_better']} worse of {d['images']}")
    if args.out:
        args.out.write_text(json.dumps({"column": args.column, "folders": {l: str(f) for l, f in args.folders},
                                        "pairs": result}, indent=1))


if __name__ == "__main__":
    main()
