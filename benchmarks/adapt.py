"""How much of a clinic's outline `lesionseg adapt` learns from N of its masks, on stand-ins for a clinic.

A stand-in clinic is the external HAM10000 split (1,000 images of whole lesions no release trained on,
`tools/external_split.py`) with every reference mask made tighter or looser by a fixed share of its area
(`--style -0.15`: 15 % less area, by thresholding the distance to the outline), or left as it is (`0`).
For each N and draw, N images are drawn at random (seeded); adapt's own procedure runs on their masks (its K-fold
self-check included), and every candidate is scored on the other images of the set, less any image of a lesion
among the N (HAM10000 holds several images of one lesion): as it was, the threshold alone (chosen on the N),
the fine-tune alone, both, and what adapt chose. With `--least-trusted`, the N are the N lowest quality
estimates instead of a random draw. The quality estimate is measured on the same held-out images before and
after adapt's recalibration. No test split is used anywhere.

    .venv/bin/python benchmarks/adapt.py --model src/lesionseg/segment/release/lesionseg-unet.onnx \
        --external runs/ham10000-split/external/test --metadata ../shared/data/ham10000-200/metadata.csv \
        --style -0.15 --n 10 25 50 100 --draws 3 --out benchmarks/results/adapt/release-tighter15.json
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from scipy.stats import spearmanr

from common import write_result
from lesionseg.segment.quality import features
from lesionseg.train.adapt import (
    THRESHOLDS,
    Clinic,
    cross_validate,
    finetune,
    jaccard_table,
    load_clinic,
    probabilities,
    recalibrated,
)
from lesionseg.train.config import AdaptRecipe
from lesionseg.train.unfold import model_from_onnx


def restyled(mask: np.ndarray, share: float) -> np.ndarray:
    """The mask with `share` more (or, negative, less) area, grown or shrunk evenly from its outline."""
    if share == 0 or not mask.any():
        return mask
    if share < 0:
        inside = ndimage.distance_transform_edt(mask)
        cut = np.quantile(inside[mask], -share)
        return inside > cut
    outside = ndimage.distance_transform_edt(~mask)
    wanted = int(round(share * mask.sum()))
    cut = np.sort(outside[~mask])[min(wanted, int((~mask).sum())) - 1]
    return mask | (outside <= cut)


def lesions_of(metadata: Path) -> dict[str, str]:
    with open(metadata, newline="") as handle:
        return {row["image_id"]: row["lesion_id"] for row in csv.DictReader(handle)}


def subset(clinic: Clinic, index: np.ndarray) -> Clinic:
    return Clinic(
        [clinic.ids[i] for i in index], clinic.images[index], clinic.masks[index], [clinic.truths[i] for i in index]
    )


def held_out(clinic: Clinic, chosen: np.ndarray, lesion: dict[str, str]) -> np.ndarray:
    """Every image not chosen and of no lesion among the chosen ones."""
    taken = {lesion.get(clinic.ids[i], clinic.ids[i]) for i in chosen}
    return np.array([i for i, image_id in enumerate(clinic.ids) if lesion.get(image_id, image_id) not in taken])


def own_index(threshold: float) -> int:
    return int(np.argmin(np.abs(np.asarray(THRESHOLDS) - threshold)))


def quality_figures(quality, maps: np.ndarray, threshold: float, truth: np.ndarray) -> dict:
    estimate = np.array([quality.estimate(features(p, threshold)) for p in maps])
    return {
        "mae": float(np.abs(estimate - truth).mean()),
        "spearman": float(spearmanr(estimate, truth).statistic),
        "mean_estimate": float(estimate.mean()),
    }


def one_draw(start, config, quality, clinic: Clinic, start_table: np.ndarray, chosen, rest, recipe) -> dict:
    """adapt's procedure on the chosen masks; every candidate scored on `rest`."""
    began = time.perf_counter()
    few = subset(clinic, chosen)
    verdict = cross_validate(start, few, config.threshold, recipe)
    tuned = finetune(start, few.images, few.masks, recipe)
    tuned_table = jaccard_table(probabilities(tuned, clinic.images[rest]), [clinic.truths[i] for i in rest])
    own = own_index(config.threshold)
    start_on_few = start_table[chosen]
    cv_tuned = jaccard_table(verdict.maps["finetune"], few.truths)
    threshold_alone = int(np.argmax(start_on_few.mean(axis=0)))
    both = int(np.argmax(cv_tuned.mean(axis=0)))
    scores = {
        "start": start_table[rest, own],
        "threshold": start_table[rest, threshold_alone],
        "finetune": tuned_table[:, own],
        "finetune+threshold": tuned_table[:, both],
    }
    picked = own_index(verdict.threshold)
    scores["adapt"] = {
        "start": start_table[rest, own],
        "threshold": start_table[rest, picked],
        "finetune": tuned_table[:, picked],
        "finetune+threshold": tuned_table[:, picked],
    }[verdict.chosen]
    result = {name: float(values.mean()) for name, values in scores.items()}
    result.update(chosen=verdict.chosen, self_check_gain=verdict.gain, self_check_interval=verdict.interval)
    result["paired_gain_adapt"] = float((scores["adapt"] - scores["start"]).mean())
    if quality is not None:
        truth_few = np.asarray(verdict.per_image[verdict.chosen])
        refit, _ = recalibrated(quality, verdict.out_of_fold_maps, verdict.threshold, truth_few, verdict.fold)
        final = tuned if verdict.chosen.startswith("finetune") else start
        maps = probabilities(final, clinic.images[rest])
        result["quality_before"] = quality_figures(quality, maps, verdict.threshold, scores["adapt"])
        result["quality_after"] = quality_figures(refit, maps, verdict.threshold, scores["adapt"])
    result["seconds"] = time.perf_counter() - began
    return result


def table(paths: list[Path]) -> str:
    """The results of several runs as one markdown table: mean over draws, paired gain of adapt's choice."""
    from common import read_result

    lines = ["| start | reference | N | draws | as it was | threshold | fine-tune | both | adapt chose | adapt | gain (min, max) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for path in paths:
        result = read_result(path)
        style = {0.0: "as drawn", -0.15: "15 % tighter", 0.15: "15 % looser"}.get(result["style"], result["style"])
        for n in sorted({run["n"] for run in result["runs"]}):
            runs = [run for run in result["runs"] if run["n"] == n]
            mean = {
                k: np.mean([run[k] for run in runs])
                for k in ("start", "threshold", "finetune", "finetune+threshold", "adapt")
            }
            gains = [run["paired_gain_adapt"] for run in runs]
            chosen = ", ".join(run["chosen"] for run in runs)
            label = "least trusted" if "least-trusted" in path.name else ""
            lines.append(
                f"| {result['model']} | {style} | {n}{' ' + label if label else ''} | {len(runs)} | {mean['start']:.4f} | "
                f"{mean['threshold']:.4f} | {mean['finetune']:.4f} | {mean['finetune+threshold']:.4f} | {chosen} | "
                f"{mean['adapt']:.4f} | {np.mean(gains):+.4f} ({min(gains):+.4f}, {max(gains):+.4f}) |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", type=Path, nargs="+", help="print the markdown table of these result files")
    parser.add_argument("--model", help="the float ONNX file adapt starts from")
    parser.add_argument("--external", type=Path, help="images/ + masks/ of the stand-in clinic")
    parser.add_argument("--metadata", type=Path, help="HAM10000's metadata.csv (lesion ids)")
    parser.add_argument("--style", type=float, default=0.0, help="area share added to every reference mask")
    parser.add_argument("--n", type=int, nargs="+", default=[10, 25, 50, 100])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--least-trusted", action="store_true", help="the N lowest quality estimates, not random")
    parser.add_argument("--epochs", type=int, default=AdaptRecipe().epochs)
    parser.add_argument("--lr", type=float, default=AdaptRecipe().lr)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.table:
        return print(table(args.table))
    start, config, source = model_from_onnx(args.model)
    clinic = load_clinic(args.external, config.image_size)
    clinic.truths = [restyled(t, args.style) for t in clinic.truths]
    clinic.masks = torch.stack([torch.from_numpy(np.asarray(restyled(m[0].numpy() > 0, args.style), np.float32))[None]
                                for m in clinic.masks])  # fmt: skip
    start_maps = probabilities(start, clinic.images)
    start_table = jaccard_table(start_maps, clinic.truths)
    estimates = np.array([source.quality.estimate(features(p, config.threshold)) for p in start_maps])
    lesion = lesions_of(args.metadata)
    results = {"model": source.version, "style": args.style, "images": len(clinic.ids), "runs": []}
    results["start_on_all"] = float(start_table[:, own_index(config.threshold)].mean())
    for n in args.n:
        for draw in range(args.draws):
            recipe = AdaptRecipe(epochs=args.epochs, lr=args.lr, seed=draw)
            rng = np.random.default_rng(1000 * n + draw)
            chosen = np.argsort(estimates)[:n] if args.least_trusted else rng.choice(len(clinic.ids), n, replace=False)
            rest = held_out(clinic, chosen, lesion)
            run = {"n": n, "draw": draw, "scored": len(rest)}
            run.update(one_draw(start, config, source.quality, clinic, start_table, chosen, rest, recipe))
            results["runs"].append(run)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in run.items() if not isinstance(v, dict)})
            write_result(args.out, results)
            if args.least_trusted:
                break


if __name__ == "__main__":
    main()
