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
import statistics
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
from lesionseg.segment.colours import COLOURS, srgb_to_lab
from lesionseg.segment.descriptors import describe, picture_of
from lesionseg.segment.prediction import run_predict

NUMERIC = ("diameter_max_px", "diameter_min_px", "asymmetry_major", "asymmetry_minor", "asymmetry_colour_major",
           "asymmetry_colour_minor", "asymmetry_texture_major", "asymmetry_texture_minor", "asymmetry_shape_axes",
           "asymmetry_axes", "compactness", "solidity", "border_step_mean", "border_abrupt_sectors", "colours",
           *(f"colour_{c}" for c in COLOURS), "old_colours", *(f"old_colour_{c}" for c in COLOURS))  # fmt: skip
DIAGNOSES = ("mel", "nv", "bkl", "bcc", "akiec", "vasc", "df")

# The v3 colour rule (descriptors before issue 41), kept here to report beside the new one: Shades of Gray colour
# constancy over the whole image, each lesion pixel to the nearest of six absolute references within dE 30,
# present at 5 % of the lesion.
OLD_REFERENCES = srgb_to_lab(np.array([(235, 230, 225), (190, 60, 70), (185, 125, 85), (100, 55, 35),
                                       (105, 115, 140), (35, 30, 30)]))  # fmt: skip


def old_colours(picture: np.ndarray, mask: np.ndarray) -> dict:
    """The v3 rule's colour columns, prefixed old_."""
    from lesionseg.segment.colours import SRGB_TO_LINEAR, linear_to_lab

    small = D.at_size(mask, picture.shape[0], picture.shape[1])
    if not small.any():
        return {}
    linear = SRGB_TO_LINEAR[picture.reshape(-1, 3)[:: max(1, picture.size // 3 // 2_000)]]
    norm = np.power(np.mean(np.power(linear, 6), axis=0), 1 / 6) + 1e-6
    gain = norm.mean() / norm
    points = np.argwhere(small)
    points = points[:: max(1, len(points) // D.MAX_POINTS)]
    lab = linear_to_lab(np.minimum(SRGB_TO_LINEAR[picture[points[:, 0], points[:, 1]]] * gain, 1.0))
    distance = np.sqrt(((lab[:, None, :] - OLD_REFERENCES[None]) ** 2).sum(-1))
    nearest = distance.argmin(axis=1)
    close = distance[np.arange(len(lab)), nearest] <= 30
    shares = np.bincount(nearest[close], minlength=6) / max(len(lab), 1)
    present = [c for c, share in zip(COLOURS, shares) if share >= 0.05]
    return {**{f"old_colour_{c}": float(v) for c, v in zip(COLOURS, shares)}, "old_colours": len(present),
            "old_colours_present": " ".join(present)}  # fmt: skip


def described(picture: np.ndarray, mask: np.ndarray) -> dict:
    """The descriptors, and the old colour rule's columns beside them."""
    picture = picture_of(picture)
    return describe(picture, mask) | old_colours(picture, mask)


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
        ours.append(described(picture, result.mask))
        theirs.append(described(picture, truth))
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
    old = [o.get("old_colours_present") == t.get("old_colours_present") for o, t in zip(ours, theirs)]
    return {"images": len(images), "descriptors": table, "asymmetry_count_agreement": float(np.mean(agree)),
            "colour_set_agreement": float(np.mean(colours)), "old_colour_set_agreement": float(np.mean(old))}  # fmt: skip


def ham_rows(ham: Path, ids: list[str], model=None) -> list[dict]:
    rows = []
    for image_id in ids:
        path = ham / "images" / f"{image_id}.jpg"
        picture = np.asarray(Image.open(path).convert("RGB"))
        mask = (
            model.segment(path).mask if model else inspect_mask(ham / "masks" / f"{image_id}.png", allow_empty=True)[0]
        )
        rows.append(described(picture, mask))
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


def axes_count(rows: list[dict], lines: dict[str, float]) -> np.ndarray:
    """The 0/1/2 count of axes on which any of shape, colour or structure passes its line."""
    count = np.zeros(len(rows))
    for axis in ("major", "minor"):
        passed = np.zeros(len(rows), bool)
        for kind, line in lines.items():
            key = f"asymmetry_{axis}" if kind == "shape" else f"asymmetry_{kind}_{axis}"
            passed |= np.array([(r.get(key) or 0) > line for r in rows])
        count += passed
    return count


def choose_lines(train_rows: list[dict], y: np.ndarray) -> dict:
    """The asymmetry lines (shape first, alone; then colour and structure with it) that best separate melanoma by
    the AUROC of the 0/1/2 count, on the training part."""
    shape = {a: roc_auc_score(y, axes_count(train_rows, {"shape": a})) for a in (0.05, 0.075, 0.10, 0.15)}
    best_shape = max(shape, key=shape.get)
    combined = {}
    for colour in (0.15, 0.2, 0.25, 0.3, 0.4, 9):  # 9: never (that part left out)
        for texture in (0.15, 0.2, 0.25, 0.3, 0.4, 9):
            lines = {"shape": best_shape, "colour": colour, "texture": texture}
            combined[f"colour {colour} texture {texture}"] = roc_auc_score(y, axes_count(train_rows, lines))
    return {"shape_alone": shape, "with_colour_and_texture": combined,
            "chosen": {"shape": best_shape, "combined": max(combined, key=combined.get)}}  # fmt: skip


def presence_rates(rows: list[dict], diagnoses: list[str], prefix: str = "") -> dict:
    """Per diagnosis, the share of lesions in which each colour is called present, and the mean count."""
    rates = {}
    for dx in DIAGNOSES:
        chosen = [r for r, d in zip(rows, diagnoses) if d == dx]
        if chosen:
            called = [set((r.get(f"{prefix}colours_present") or "").split()) for r in chosen]
            rates[dx] = {c: float(np.mean([c in s for s in called])) for c in COLOURS} | {
                "count": float(np.mean([len(s) for s in called])),
                "lesions": len(chosen),
            }
    return rates


def signal(ham: Path, split: Path, model) -> dict:
    with open(ham / "metadata.csv", newline="") as handle:
        every = {row["image_id"]: row for row in csv.DictReader(handle)}
    meta = {i: row for i, row in every.items() if row["dx"] in ("mel", "nv")}
    external = set(json.loads(split.read_text())["ids"])
    train_ids = sorted(i for i in meta if i not in external)
    test_ids = sorted(i for i in meta if i in external)
    others = sorted(i for i, row in every.items() if i not in external and row["dx"] not in ("mel", "nv"))
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
    other_rows = ham_rows(ham, others)
    diagnoses = [meta[i]["dx"] for i in train_ids] + [every[i]["dx"] for i in others]
    result["colours_called_on_training"] = {
        rule: presence_rates(train_rows + other_rows, diagnoses, prefix)
        for rule, prefix in (("new", ""), ("old", "old_"))
    }
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
            timings, busy = {"with": [], "without": []}, {"with": [], "without": []}
            for repeat in range(repeats):
                for kind in ("with", "without"):
                    patch = (
                        mock.patch.object(prediction, "describe", lambda *a: {})
                        if kind == "without"
                        else mock.patch.object(prediction, "OUTLINE_DUMMY", None, create=True)
                    )
                    with patch:
                        start, cpu = time.perf_counter(), time.process_time()
                        run_predict(model.pipeline, files, Path(folder) / f"out-{name}-{kind}-{repeat}", progress=False)
                        timings[kind].append((time.perf_counter() - start) / len(files))
                        busy[kind].append((time.process_time() - cpu) / (time.perf_counter() - start))
            pairs = []
            for path in files:
                picture, size, _ = read_for_model(path, str(path), model.pipeline.image_size)
                pairs.append((picture_of(picture), model.segment(path).mask))
            start = time.perf_counter()
            for picture, mask in pairs:
                describe(picture, mask)
            alone = (time.perf_counter() - start) / len(files)
            with_, without = min(timings["with"]), min(timings["without"])
            results[name] = {"predict_s": with_, "predict_without_descriptors_s": without,
                             "added_share": with_ / without - 1, "describe_alone_s": alone, "images": len(files),
                             "cores_busy": {kind: statistics.median(v) for kind, v in busy.items()}}  # fmt: skip
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
