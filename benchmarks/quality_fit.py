"""Which rows to fit the quality estimate on: the release run's validation images as shipped, or those plus
out-of-fold rows over the ISIC training images (`tools/quality_folds.py`).

Each candidate is fitted without the ISIC validation rows of the release-recipe models, which are then its
held-out check: the release model's own 81 and a second seed's 81 (other images, a model that never saw them),
162 ISIC images scored by the models the estimate is for. The candidate with the best mean of Spearman and AUROC
there is chosen; then, once, the chosen fit and the shipped one on the test split. Gradient-boosted trees on the
same rows are reported beside the ridge score, on the held-out rows only.

    .venv/bin/python benchmarks/quality_fit.py --release-val R/eval-val --release-external R/eval-external \
        --seed-val S/eval-val --folds runs/quality-folds/fold*/eval --test R/eval-test \
        --out benchmarks/results/quality_fit/folds.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from common import write_result
from lesionseg.train.qualityfit import estimates, fit, out_of_fold, read_evaluations, read_rows
from lesionseg.train.qualitymetrics import quality_accuracy


def summary(quality: np.ndarray, truth: np.ndarray) -> dict:
    accuracy = quality_accuracy(quality, truth)
    at_90 = next(row for row in accuracy["risk_coverage"] if row["coverage"] == 0.9)
    return {
        "images": accuracy["images"],
        "spearman": round(accuracy["spearman"], 4),
        "auroc_below_0.7": round(accuracy["auroc_below_0.7"], 4),
        "mae": round(accuracy["mae"], 4),
        "worst_decile_at_90": round(at_90["worst_decile"], 4),
    }


def trees(x: np.ndarray, y: np.ndarray):
    """The nonlinear alternative to the ridge score the issue allows ("a few trees"), for comparison only."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    return HistGradientBoostingRegressor(max_depth=3, max_iter=100, learning_rate=0.05, random_state=0).fit(x, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release-val", type=Path, required=True, help="evaluate folder: the release run's val")
    parser.add_argument("--release-external", type=Path, required=True, help="... its external validation set")
    parser.add_argument("--seed-val", type=Path, required=True, help="... a second seed's own val images")
    parser.add_argument("--folds", type=Path, nargs="+", required=True, help="quality_folds.py's evaluate folders")
    parser.add_argument("--test", type=Path, help="the release model on the test split, scored after the choice")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    candidates = {
        "as shipped: external": [args.release_external],
        "external + ISIC out of fold": [args.release_external, *args.folds],
        "ISIC out of fold only": list(args.folds),
    }
    held_x, held_y, held_names = read_evaluations([args.release_val, args.seed_val])
    results = {"held_out": held_names, "candidates": {}}
    for name, folders in candidates.items():
        x, y, fitted_on = read_evaluations(folders)
        model = fit(x, y, fitted_on)
        results["candidates"][name] = {
            "fitted_on": fitted_on,
            "held_out_isic_val": summary(estimates(model, held_x), held_y),
            "own_rows_out_of_fold": summary(out_of_fold(x, y), y),
            "held_out_isic_val_with_trees": summary(trees(x, y).predict(held_x), held_y),
        }
        print(name, results["candidates"][name], flush=True)

    def merit(name: str) -> float:
        held = results["candidates"][name]["held_out_isic_val"]
        return (held["spearman"] + held["auroc_below_0.7"]) / 2

    chosen = max(candidates, key=merit)
    results["chosen"] = chosen
    if args.test:  # once, after the choice: the chosen rows and the shipped ones, each with the release val added
        test_x, test_y, _ = read_rows(args.test / "per_image.csv")
        for name in dict.fromkeys([chosen, "as shipped: external"]):
            x, y, fitted_on = read_evaluations([args.release_val, *candidates[name]])
            results["candidates"][name]["test"] = summary(estimates(fit(x, y, fitted_on), test_x), test_y)
            print(name, "test", results["candidates"][name]["test"], flush=True)
    print(write_result(args.out, results))


if __name__ == "__main__":
    main()
