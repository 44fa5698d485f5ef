"""Which inference refinements to use, chosen on each run's own validation images, then reported on the test split.

For every trained run (a folder with best.pt and split.json) each candidate refinement is scored on the run's
validation images and on the test split, both at the stored resolution; the candidate with the best validation
Jaccard is the run's choice. Reported per candidate: validation and test mean per-image Jaccard, the paired
bootstrap interval of its gain over plain on each, and the worst decile on test. The test column is never used
to choose.

    .venv/bin/python benchmarks/refinements.py runs/size192/192px-6ep runs/ham-equal-time/isic2018-extra-5ep \
        --out benchmarks/results/refinements/refinements-release-v1.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import write_result
from lesionseg.train.evaluation import Refinements, evaluate_checkpoint
from lesionseg.train.metrics import paired_difference

POST = {"largest_component": True, "fill_holes": True}
CANDIDATES = (
    Refinements(),
    Refinements(tta=True),
    Refinements(tta=True, **POST),
    Refinements(tta=True, rotations=True),
    Refinements(tta=True, rotations=True, **POST),
)


def scores(run: Path, split: str, refine: Refinements, data: str | None = None) -> dict:
    result = evaluate_checkpoint(run, data, split=split, refine=refine, source_resolution=True, progress=False)
    metrics = result["metrics_source_resolution"]
    return {
        "iou_per_image": metrics["iou_per_image"],
        "iou_worst_decile": metrics["iou_worst_decile"],
        "per_image": {row["id"]: row["iou_source"] for row in result["per_image"]},
    }


def choose(run: Path, data: str | None = None) -> dict:
    """Every candidate on validation and test; the choice is the best on validation (ties: the fewest views)."""
    rows = {}
    for refine in CANDIDATES:
        begin = time.perf_counter()
        rows[refine.name] = {
            "views": len(refine.views),
            "val": scores(run, "val", refine, data),
            "test": scores(run, "test", refine, data),
            "seconds": time.perf_counter() - begin,
        }
    for row in rows.values():
        for split in ("val", "test"):
            row[f"{split}_gain_over_plain"] = paired_difference(
                row[split]["per_image"], rows["plain"][split]["per_image"]
            )
    chosen = max(rows, key=lambda name: (rows[name]["val"]["iou_per_image"], -rows[name]["views"]))
    for row in rows.values():
        for split in ("val", "test"):
            row[split].pop("per_image")
    return {"chosen_on_validation": chosen, "candidates": rows}


def table(run: str, result: dict) -> str:
    lines = [
        f"{run} (chosen on validation: {result['chosen_on_validation']})",
        "",
        "| refinement | views | validation Jaccard (gain, 95 % interval) | test Jaccard (gain, 95 % interval) | test worst decile |",
        "|---|---|---|---|---|",
    ]
    for name, row in result["candidates"].items():
        cells = []
        for split in ("val", "test"):
            gain = row[f"{split}_gain_over_plain"]
            cells.append(
                f"{row[split]['iou_per_image']:.4f} ({gain['mean']:+.4f}, {gain['ci95_low']:+.4f} to {gain['ci95_high']:+.4f})"
            )
        lines.append(f"| {name} | {row['views']} | {cells[0]} | {cells[1]} | {row['test']['iou_worst_decile']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "runs",
        nargs="+",
        type=Path,
        help="run folders with best.pt and split.json, or .onnx files with the run's split.json beside",
    )
    parser.add_argument("--data", help="the dataset (needed for .onnx files; default: the run's own)")
    parser.add_argument("--out", type=Path, help="write the JSON here")
    args = parser.parse_args()
    results = {}
    for run in args.runs:
        results[str(run)] = choose(run, args.data)
        print(table(str(run), results[str(run)]), "\n", flush=True)
    if args.out:
        write_result(args.out, {"runs": results})


if __name__ == "__main__":
    main()
