"""Which model holds on other clinics' images: every model on both validation sets, at several thresholds.

Validation 1 is the run's own 81 ISIC images (its split.json); validation 2 is the external HAM10000 set
(`tools/external_split.py link`: 1,000 images of whole lesions no training run sees). Each is scored at the
stored resolution; the two means are averaged with equal weight (one ISIC-like, one from other clinics) into the
figure that chooses, first the threshold of each model, then the model. With `--test`, the test split is scored
once afterwards at each model's chosen threshold, beside the choice and never used for it. Intervals: paired
bootstrap of each model's per-image gain over the first model's, on each set.

    .venv/bin/python benchmarks/generalization.py v1=runs/release-v1/model.onnx runs/v2/aug \
        --isic ../shared/data/isic2016-256 --external runs/ham10000-split/external \
        --out benchmarks/results/generalization/levers.json [--test]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import write_result
from lesionseg.train.evaluation import images_to_score, pipeline_for, probabilities_of, score_probabilities
from lesionseg.train.metrics import paired_difference

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)


def scored(pipeline, probabilities, cached, data, split: str, threshold: float) -> dict:
    pipeline.threshold = threshold
    result = score_probabilities(pipeline, probabilities, cached, data, split, source_resolution=True)
    metrics = result["metrics_source_resolution"]
    return {
        "iou": metrics["iou_per_image"],
        "worst_decile": metrics["iou_worst_decile"],
        "sensitivity": metrics["sensitivity_per_image"],
        "specificity": metrics["specificity_per_image"],
        "per_image": {row["id"]: row["iou_source"] for row in result["per_image"]},
    }


def model_scores(source: str, sets: dict[str, tuple[Path, str]], thresholds, test: Path | None) -> dict:
    """Each set at each threshold; the threshold chosen by the mean of the two validation sets; test at it."""
    by_set: dict[str, dict] = {}
    for name, (data, split) in sets.items():
        pipeline, scoring, _ = pipeline_for(source, data)
        cached = images_to_score(source, split, scoring)
        probabilities = probabilities_of(pipeline, cached.images)
        by_set[name] = {t: scored(pipeline, probabilities, cached, data, split, t) for t in thresholds}
    combined = {t: sum(by_set[name][t]["iou"] for name in sets) / len(sets) for t in thresholds}
    chosen = max(thresholds, key=lambda t: combined[t])
    row = {"combined": combined, "threshold": chosen, "sets": by_set}
    if test is not None:
        pipeline, scoring, _ = pipeline_for(source, test)
        cached = images_to_score(source, "test", scoring)
        row["test"] = {
            t: scored(pipeline, probabilities_of(pipeline, cached.images), cached, test, "test", t)
            for t in sorted({0.5, chosen})
        }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="LABEL=RUN_OR_ONNX (an ONNX file needs split.json beside it)")
    parser.add_argument("--isic", type=Path, required=True, help="the ISIC data folder the runs validated on")
    parser.add_argument("--external", type=Path, required=True, help="the external validation folder")
    parser.add_argument("--thresholds", type=float, nargs="+", default=THRESHOLDS)
    parser.add_argument("--test", action="store_true", help="then score the test split once (never to choose)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    sets = {"isic_val": (args.isic, "val"), "external": (args.external, "test")}
    results = {}
    for item in args.models:
        label, _, source = item.rpartition("=")
        label = label or Path(source).name
        results[label] = model_scores(source, sets, args.thresholds, args.isic if args.test else None)
        row = results[label]
        print(
            f"{label}: threshold {row['threshold']} combined {row['combined'][row['threshold']]:.4f}",
            {name: f"{s[row['threshold']]['iou']:.4f} (0.5: {s[0.5]['iou']:.4f})" for name, s in row["sets"].items()},
        )
    first = next(iter(results.values()))
    for label, row in list(results.items())[1:]:
        row["gain_over_first"] = {
            name: paired_difference(
                s[row["threshold"]]["per_image"], first["sets"][name][first["threshold"]]["per_image"]
            )
            for name, s in row["sets"].items()
        }
        print(label, "gain over", next(iter(results)), row["gain_over_first"])
    for row in results.values():  # per-image scores are kept only where the intervals need them
        for s in row["sets"].values():
            for t, scores in s.items():
                if t != row["threshold"]:
                    scores.pop("per_image")
        for scores in row.get("test", {}).values():
            scores.pop("per_image")
    write_result(args.out, results)


if __name__ == "__main__":
    main()
