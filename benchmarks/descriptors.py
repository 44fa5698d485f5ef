"""How far the lesion descriptors can be trusted, and what they say: robustness to our own segmentation errors,
melanoma-against-nevus signal, and their cost beside predict's.

1. Robust to our errors (`--isic`): on the ISIC 2016 test split (339 images), each descriptor from the release's
   mask against the same descriptor from the expert's mask: Spearman, intraclass correlation ICC(2,1) (absolute
   agreement) and, for the diameters, the median relative error. Only measured there, nothing chosen.
2. Signal (`--ham`): melanoma (mel) against nevus (nv) on HAM10000. The decision lines (the asymmetric-axis share,
   the colour presence share) are chosen on the training part (HAM10000 less the 1,000-image external split,
   expert masks) by the AUROC of the 0/1/2 and colour counts; one combined score (logistic regression on every
   descriptor, standardized) is fitted there too. Everything is then measured once on the external split, with
   the release's masks (what a user gets) and with the expert's: AUROC per descriptor and combined, bootstrap 95 %
   intervals by lesion.
3. Cost: describing one image against predicting it, side by side on the same images.

    .venv/bin/python benchmarks/descriptors.py --isic ../shared/data/isic2016-256 \
        --ham ../shared/data/ham10000-200 --split tools/splits/ham10000-external.json \
        --out benchmarks/results/descriptors/descriptors.json
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.stats import spearmanr
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

import lesionseg
from common import write_result
from lesionseg.images import inspect_mask
from lesionseg.segment import descriptors as D
from lesionseg.segment.descriptors import describe_lesion, picture_of
from lesionseg.segment.prediction import run_predict

NUMERIC = ("diameter_max_px", "diameter_min_px", "asymmetry_major", "asymmetry_minor", "asymmetry_axes",
           "compactness", "solidity", "border_step_mean", "border_abrupt_sectors", "colours",
           *(f"colour_{c}" for c in D.COLOURS_RGB))  # fmt: skip


def icc(a: np.ndarray, b: np.ndarray) -> float:
    """ICC(2,1): two-way random effects, absolute agreement, single rater (Shrout and Fleiss)."""
    x = np.stack([a, b], 1).astype(float)
    n, k = x.shape
    grand = x.mean()
    ms_rows = k * ((x.mean(1) - grand) ** 2).sum() / (n - 1)
    ms_cols = n * ((x.mean(0) - grand) ** 2).sum() / (k - 1)
    ms_err = ((x - x.mean(1, keepdims=True) - x.mean(0, keepdims=True) + grand) ** 2).sum() / ((n - 1) * (k - 1))
    return float((ms_rows - ms_err) / (ms_rows + (k - 1) * ms_err + k * (ms_cols - ms_err) / n))


def robustness(isic: Path, model) -> dict:
    images = sorted((isic / "ISBI2016_ISIC_Part1_Test_Data").glob("*.jpg"))
    ours, theirs = [], []
    for path in images:
        result = model.segment(path)
        truth, _ = inspect_mask(isic / "ISBI2016_ISIC_Part1_Test_GroundTruth" / f"{path.stem}_Segmentation.png")
        picture = picture_of(Image.open(path).convert("RGB"))
        ours.append(describe_lesion(picture, result.mask))
        theirs.append(describe_lesion(picture, truth))
    table = {}
    for key in NUMERIC:
        pairs = np.array(
            [
                (o.get(key), t.get(key))
                for o, t in zip(ours, theirs)
                if o.get(key) is not None and t.get(key) is not None
            ],
            float,
        )
        table[key] = {
            "spearman": float(spearmanr(pairs[:, 0], pairs[:, 1]).statistic),
            "icc": icc(pairs[:, 0], pairs[:, 1]),
        }
        if key.startswith("diameter"):
            table[key]["median_relative_error"] = float(np.median(np.abs(pairs[:, 0] - pairs[:, 1]) / pairs[:, 1]))
    agree = [o.get("asymmetry_axes") == t.get("asymmetry_axes") for o, t in zip(ours, theirs)]
    colours = [o.get("colours_present") == t.get("colours_present") for o, t in zip(ours, theirs)]
    return {"images": len(images), "descriptors": table, "asymmetry_count_agreement": float(np.mean(agree)),
            "colour_set_agreement": float(np.mean(colours))}  # fmt: skip


def ham_rows(ham: Path, ids: list[str], model=None) -> list[dict]:
    rows = []
    for image_id in ids:
        path = ham / "images" / f"{image_id}.jpg"
        picture = np.asarray(Image.open(path).convert("RGB"))
        mask = (
            model.segment(path).mask if model else inspect_mask(ham / "masks" / f"{image_id}.png", allow_empty=True)[0]
        )
        rows.append(describe_lesion(picture, mask))
    return rows


def auroc_interval(y: np.ndarray, score: np.ndarray, groups: np.ndarray, seed: int = 0) -> list[float]:
    """AUROC with a 95 % bootstrap interval that resamples whole lesions."""
    rng, unique = np.random.default_rng(seed), np.unique(groups)
    index = {g: np.flatnonzero(groups == g) for g in unique}
    values = []
    for _ in range(1000):
        take = np.concatenate([index[g] for g in rng.choice(unique, len(unique))])
        if len(np.unique(y[take])) == 2:
            values.append(roc_auc_score(y[take], score[take]))
    return [float(roc_auc_score(y, score)), float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))]


def matrix(rows: list[dict]) -> np.ndarray:
    return np.array([[row.get(k) if row.get(k) is not None else np.nan for k in NUMERIC] for row in rows], float)


def choose_lines(train_rows: list[dict], y: np.ndarray) -> dict:
    """The asymmetric-axis share and the colour presence share that best separate melanoma on the training part."""
    major = np.array([r.get("asymmetry_major", 0) for r in train_rows])
    minor = np.array([r.get("asymmetry_minor", 0) for r in train_rows])
    shares = np.array([[r.get(f"colour_{c}", 0) for c in D.COLOURS_RGB] for r in train_rows])
    asym = {
        a: roc_auc_score(y, (major > a).astype(int) + (minor > a)) for a in (0.05, 0.075, 0.10, 0.125, 0.15, 0.2, 0.25)
    }
    colour = {s: roc_auc_score(y, (shares >= s).sum(1)) for s in (0.01, 0.02, 0.03, 0.05, 0.075, 0.1)}
    return {"asymmetric": asym, "present_share": colour,
            "chosen": {"asymmetric": max(asym, key=asym.get), "present_share": max(colour, key=colour.get)}}  # fmt: skip


def signal(ham: Path, split: Path, model) -> dict:
    with open(ham / "metadata.csv", newline="") as handle:
        meta = {row["image_id"]: row for row in csv.DictReader(handle) if row["dx"] in ("mel", "nv")}
    external = set(json.loads(split.read_text())["ids"])
    train_ids = sorted(i for i in meta if i not in external)
    test_ids = sorted(i for i in meta if i in external)
    y_train = np.array([meta[i]["dx"] == "mel" for i in train_ids], int)
    y_test = np.array([meta[i]["dx"] == "mel" for i in test_ids], int)
    groups = np.array([meta[i]["lesion_id"] for i in test_ids])
    train_rows = ham_rows(ham, train_ids)
    lines = choose_lines(train_rows, y_train)
    x_train = matrix(train_rows)
    fill = np.nanmedian(x_train, axis=0)
    mean, scale = np.nanmean(x_train, 0), np.nanstd(x_train, 0) + 1e-9
    standard = lambda x: (np.where(np.isnan(x), fill, x) - mean) / scale
    combined = LogisticRegression(max_iter=2000, class_weight="balanced").fit(standard(x_train), y_train)
    result = {"train": {"melanoma": int(y_train.sum()), "nevus": int(len(y_train) - y_train.sum())},
              "external": {"melanoma": int(y_test.sum()), "nevus": int(len(y_test) - y_test.sum())},
              "lines_on_training": lines}  # fmt: skip
    for masks, rows in (("release", ham_rows(ham, test_ids, model)), ("expert", ham_rows(ham, test_ids))):
        x = matrix(rows)
        per = {}
        for n, key in enumerate(NUMERIC):
            values = np.where(np.isnan(x[:, n]), fill[n], x[:, n])
            sign = 1 if roc_auc_score(y_train, np.where(np.isnan(x_train[:, n]), fill[n], x_train[:, n])) >= 0.5 else -1
            per[key] = auroc_interval(y_test, sign * values, groups)  # the direction fixed on the training part
        per["combined"] = auroc_interval(y_test, combined.decision_function(standard(x)), groups)
        result[f"external_auroc_{masks}_masks"] = per
    return result


def cost(isic: Path, model, repeats: int = 5, count: int = 100) -> dict:
    """What describing adds to `predict`, end to end: the same images predicted with the descriptors and with
    them switched off, alternating, the fastest of `repeats` each; at the stored 256 px and on 1504x1128 JPEG
    copies (a common dermatoscope size). Also describing alone, per image, on predict's reduced decode."""
    import tempfile
    from unittest import mock

    from lesionseg.segment import prediction
    from lesionseg.segment.pipeline import read_for_model

    results = {}
    with tempfile.TemporaryDirectory() as folder:
        large = Path(folder) / "large"
        large.mkdir()
        images = sorted((isic / "ISBI2016_ISIC_Part1_Test_Data").glob("*.jpg"))[:count]
        for path in images:
            Image.open(path).convert("RGB").resize((1504, 1128), Image.Resampling.BICUBIC).save(
                large / path.name, quality=92
            )
        for name, files in (("256px", images), ("1504x1128", sorted(large.iterdir()))):
            timings = {"with": [], "without": []}
            for repeat in range(repeats):
                for kind in ("with", "without"):
                    patch = (
                        mock.patch.object(prediction, "describe_lesion", lambda *a: {})
                        if kind == "without"
                        else mock.patch.object(prediction, "OUTLINE_DUMMY", None, create=True)
                    )
                    with patch:
                        start = time.perf_counter()
                        run_predict(model.pipeline, files, Path(folder) / f"out-{name}-{kind}-{repeat}", progress=False)
                        timings[kind].append((time.perf_counter() - start) / len(files))
            pairs = []
            for path in files:
                picture, size, _ = read_for_model(path, str(path), model.pipeline.image_size)
                pairs.append((picture_of(picture), model.segment(path).mask))
            start = time.perf_counter()
            for picture, mask in pairs:
                describe_lesion(picture, mask)
            alone = (time.perf_counter() - start) / len(files)
            with_, without = min(timings["with"]), min(timings["without"])
            results[name] = {"predict_s": with_, "predict_without_descriptors_s": without,
                             "added_share": with_ / without - 1, "describe_alone_s": alone, "images": len(files)}  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--isic", type=Path, required=True)
    parser.add_argument("--ham", type=Path, required=True)
    parser.add_argument("--split", type=Path, required=True, help="tools/splits/ham10000-external.json")
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", choices=("robustness", "signal", "cost"), nargs="*")
    args = parser.parse_args()
    model = lesionseg.load()
    parts = args.only or ("robustness", "signal", "cost")
    results = {}
    if "cost" in parts:
        results["cost"] = cost(args.isic, model)
    if "robustness" in parts:
        results["robustness"] = robustness(args.isic, model)
    if "signal" in parts:
        results["signal"] = signal(args.ham, args.split, model)
    write_result(args.out, results)
    print(json.dumps(results, indent=1)[:4000])


if __name__ == "__main__":
    main()
