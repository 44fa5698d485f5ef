"""How much of a clinic's outline `lesionseg adapt` learns from N of its masks, on stand-ins for a clinic.

A stand-in clinic is the external HAM10000 split (1,000 images of whole lesions no release trained on,
`tools/external_split.py`) with every reference mask made tighter or looser by a fixed share of its area
(`--style -0.15`: 15 % less area, by thresholding the distance to the outline), or left as it is (`0`).
For each N and draw, N images are drawn at random (seeded); adapt's own procedure runs on their masks (its K-fold
check and decision included), and every lever is scored on the other images of the set, less any image of a lesion
among the N (HAM10000 holds several images of one lesion): as it was, the threshold alone (chosen on the N), the
fine-tune (at the start's threshold and at the one fitted on its out-of-fold maps), and what adapt chose. The
decision is also judged: a "false keep" kept the start where the fine-tune gained more than 0.003 on the held-out
images, a "false adapt" adopted a lever that lost more than 0.003 there. With `--least-trusted`, the N are the N
lowest quality estimates instead of a random draw. The quality estimate is measured on the same held-out images
before and after adapt's recalibration. No test split is used anywhere.

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
from lesionseg.segment.pipeline import offset_border
from lesionseg.segment.quality import features
from lesionseg.train.adapt.calibrate import calibration
from lesionseg.train.adapt.clinic import THRESHOLDS, Clinic, border_index, border_table, jaccard_table, load_clinic
from lesionseg.train.adapt.decide import cross_validate, fitted_border
from lesionseg.train.adapt.finetune import finetune, probabilities
from lesionseg.train.adapt.unfold import model_from_onnx
from lesionseg.train.config import AdaptRecipe

NOTICEABLE = 0.003  # a held-out change smaller than this is neither a gain nor a loss for the decision's rates


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


def held_out(clinic: Clinic, chosen: np.ndarray, lesion: dict[str, str]) -> np.ndarray:
    """Every image not chosen and of no lesion among the chosen ones."""
    taken = {lesion.get(clinic.ids[i], clinic.ids[i]) for i in chosen}
    return np.array([i for i, image_id in enumerate(clinic.ids) if lesion.get(image_id, image_id) not in taken])


def own_index(threshold: float) -> int:
    return int(np.argmin(np.abs(np.asarray(THRESHOLDS) - threshold)))


def quality_figures(quality, maps: np.ndarray, threshold: float, truth: np.ndarray, shift: float = 0.0) -> dict:
    estimate = np.clip(np.array([quality.estimate(features(p, threshold)) for p in maps]) + shift, 0, 1)
    return {
        "mae": float(np.abs(estimate - truth).mean()),
        "spearman": float(spearmanr(estimate, truth).statistic),
        "mean_estimate": float(estimate.mean()),
    }


def mistakes(run: dict) -> dict[str, bool]:
    """A false keep: adapt left the model as it was (the start, or the border not moved) where a lever gained more
    than NOTICEABLE on the held-out images; a false adapt: what it chose lost more than that there."""
    kept = run["adapt"] == run["start"]  # the same column of the same table: equal exactly when nothing moved
    held_out_gain = max(run["finetune+border"], run["border"]) - run["start"]
    return {"false_keep": kept and held_out_gain > NOTICEABLE, "false_adapt": run["adapt"] - run["start"] < -NOTICEABLE}


def one_draw(start, config, quality, clinic: Clinic, start_table: np.ndarray, chosen, rest, recipe) -> dict:
    """adapt's procedure on the chosen masks; every lever scored on `rest` (`start_table`: border_table of the
    starting model on every image)."""
    began = time.perf_counter()
    few = clinic.subset(chosen)
    verdict = cross_validate(start, few, config.threshold, recipe)
    tuned = finetune(start, few.images, few.masks, recipe)
    seconds = time.perf_counter() - began
    tuned_maps = probabilities(tuned, clinic.images[rest])
    tuned_table = border_table(tuned_maps, [clinic.truths[i] for i in rest])
    own = border_index(0.0, config.threshold)
    picked = border_index(verdict.border_offset, verdict.threshold)
    fitted = (
        picked
        if verdict.chosen == "finetune"
        else fitted_border(border_table(verdict.maps["finetune"], few.truths), own)
    )
    scores = {
        "start": start_table[rest, own],
        "border": start_table[rest, fitted_border(start_table[chosen], own)],
        "finetune": tuned_table[:, own],
        "finetune+border": tuned_table[:, fitted],
    }
    scores["adapt"] = {
        "start": start_table[rest, own],
        "border": start_table[rest, picked],
        "finetune": tuned_table[:, picked],
    }[verdict.chosen]
    result = {name: float(values.mean()) for name, values in scores.items()}
    result.update(
        chosen=verdict.chosen,
        border_offset=verdict.border_offset,
        threshold=verdict.threshold,
        cv_gain_finetune=verdict.gain("finetune"),
        cv_gain_border=verdict.gain("border"),
    )
    result.update(mistakes(result))
    result["paired_gain_adapt"] = float((scores["adapt"] - scores["start"]).mean())
    if quality is not None:  # the shipped estimate on the held-out images, and what the shrunk shift would give
        shifted = lambda maps: np.stack([offset_border(p, verdict.border_offset) for p in maps])  # noqa: E731
        measured = calibration(
            quality, shifted(verdict.out_of_fold_maps), verdict.threshold, verdict.per_image[verdict.chosen]
        )
        maps = shifted(tuned_maps if verdict.chosen == "finetune" else probabilities(start, clinic.images[rest]))
        result["quality_before"] = quality_figures(quality, maps, verdict.threshold, scores["adapt"])
        result["quality_after"] = quality_figures(
            quality, maps, verdict.threshold, scores["adapt"], measured["shrunk_shift"]
        )
    result["seconds"] = seconds  # the procedure adapt runs (five fold fine-tunes and the final one), not the scoring
    return result


def table(paths: list[Path]) -> str:
    """The results of several runs as one markdown table: mean over draws; adapt's paired gain (worst, best draw);
    the share of the style's loss recovered; the decision's false keeps and adapts; the quality estimate's error."""
    from common import read_result

    lines = ["| start | reference | N | draws | as it was | border | fine-tune | fine-tune + border | adapt chose | adapt | gain (worst, best) | recovered (worst) | false keep / adapt | quality MAE shipped → if shifted |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for path in paths:
        result = read_result(path)
        style = {0.0: "as drawn", -0.15: "15 % tighter", 0.15: "15 % looser"}.get(result["style"], result["style"])
        for n in sorted({run["n"] for run in result["runs"]}):
            runs = [run for run in result["runs"] if run["n"] == n]
            mean = {
                k: np.mean([run[k] for run in runs])
                for k in ("start", "border", "finetune", "finetune+border", "adapt")
            }
            gains = [run["paired_gain_adapt"] for run in runs]
            chosen = ", ".join(run["chosen"] for run in runs)
            lost = [run["start_as_drawn"] - run["start"] for run in runs]
            recovered = (
                f"{np.mean([gain / loss for gain, loss in zip(gains, lost)]):.0%} ({min(gain / loss for gain, loss in zip(gains, lost)):.0%})"
                if result["style"] != 0
                else "–"
            )
            judged = [mistakes(r) for r in runs]  # judged again: files written before the rule counted a kept border
            errors = f"{sum(j['false_keep'] for j in judged)} / {sum(j['false_adapt'] for j in judged)}"
            mae = [(r["quality_before"]["mae"], r["quality_after"]["mae"]) for r in runs if "quality_before" in r]
            quality = " ".join(f"{b:.3f}→{a:.3f}" for b, a in mae) or "–"
            label = " least trusted" if "least-trusted" in path.name else ""
            lines.append(
                f"| {result['model']} | {style} | {n}{label} | {len(runs)} | {mean['start']:.4f} | "
                f"{mean['border']:.4f} | {mean['finetune']:.4f} | {mean['finetune+border']:.4f} | {chosen} | "
                f"{mean['adapt']:.4f} | {np.mean(gains):+.4f} ({min(gains):+.4f}, {max(gains):+.4f}) | {recovered} | "
                f"{errors} | {quality} |"
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
    parser.add_argument("--first-draw", type=int, default=0, help="skip the draws before this one (a rerun)")
    parser.add_argument("--least-trusted", action="store_true", help="the N lowest quality estimates, not random")
    parser.add_argument("--steps", type=int, default=AdaptRecipe().steps)
    parser.add_argument("--lr", type=float, default=AdaptRecipe().lr)
    parser.add_argument("--encoder-lr-scale", type=float, default=AdaptRecipe().encoder_lr_scale)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.table:
        return print(table(args.table))
    start, config, source = model_from_onnx(args.model)
    clinic = load_clinic(args.external, config.image_size)
    as_drawn = jaccard_table(probabilities(start, clinic.images), clinic.truths)[:, own_index(config.threshold)]
    clinic.truths = [restyled(t, args.style) for t in clinic.truths]
    clinic.masks = torch.stack([torch.from_numpy(np.asarray(restyled(m[0].numpy() > 0, args.style), np.float32))[None]
                                for m in clinic.masks])  # fmt: skip
    start_maps = probabilities(start, clinic.images)
    start_table = border_table(start_maps, clinic.truths)
    estimates = np.array([source.quality.estimate(features(p, config.threshold)) for p in start_maps])
    lesion = lesions_of(args.metadata)
    results = {"model": source.version, "style": args.style, "images": len(clinic.ids), "runs": []}
    results["recipe"] = {"steps": args.steps, "lr": args.lr, "encoder_lr_scale": args.encoder_lr_scale}
    results["start_on_all"] = float(start_table[:, border_index(0.0, config.threshold)].mean())
    for n in args.n:
        for draw in range(args.first_draw, args.draws):
            recipe = AdaptRecipe(steps=args.steps, lr=args.lr, encoder_lr_scale=args.encoder_lr_scale, seed=draw)
            rng = np.random.default_rng(1000 * n + draw)
            chosen = np.argsort(estimates)[:n] if args.least_trusted else rng.choice(len(clinic.ids), n, replace=False)
            rest = held_out(clinic, chosen, lesion)
            run = {"n": n, "draw": draw, "scored": len(rest), "start_as_drawn": float(as_drawn[rest].mean())}
            run.update(one_draw(start, config, source.quality, clinic, start_table, chosen, rest, recipe))
            results["runs"].append(run)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in run.items() if not isinstance(v, dict)})
            write_result(args.out, results)
            if args.least_trusted:
                break


if __name__ == "__main__":
    main()
