"""Fit the per-image quality estimate (`lesionseg.segment.quality`) on validation images, and measure how well it works.

The fit reads `evaluate`'s per_image.csv of validation images only (the run's own validation split, an external
validation set): each row holds the features the estimate reads (`q_*`) and the image's true Jaccard. A ridge
regression of the Jaccard on the standardized features gives a score that ranks the images; an isotonic
regression of the Jaccard on that score maps it to an estimate that can be read as a Jaccard. Both are small
enough to ship as JSON inside the exported model. NumPy and SciPy only at inference; scikit-learn here.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from lesionseg.errors import LesionsegError
from lesionseg.segment.quality import FEATURES, REVIEW_BELOW, QualityModel
from lesionseg.train.qualitymetrics import quality_accuracy, risk_coverage

KNOTS = 64  # the isotonic map is kept at this many points


def read_rows(path: Path, truth: str = "iou_source") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """features (N,F), true Jaccard (N,) and ids from an evaluate per_image.csv."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or f"q_{FEATURES[0]}" not in rows[0] or truth not in rows[0]:
        raise LesionsegError(f"{path}: no quality features or no {truth} column (evaluate --source-resolution)")
    x = np.array([[float(row[f"q_{name}"]) for name in FEATURES] for row in rows])
    return x, np.array([float(row[truth]) for row in rows]), [row["id"] for row in rows]


def fit(x: np.ndarray, y: np.ndarray, fitted_on: str, alpha: float = 1.0) -> QualityModel:
    """The ridge score and its isotonic map to Jaccard, fitted on (features, true Jaccard) of validation images."""
    from sklearn.isotonic import IsotonicRegression
    from sklearn.linear_model import Ridge

    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale == 0] = 1.0
    ridge = Ridge(alpha=alpha).fit((x - mean) / scale, y)
    score = ridge.predict((x - mean) / scale)
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(score, y)
    knots_x = np.quantile(score, np.linspace(0, 1, KNOTS))
    return QualityModel(
        mean=mean.tolist(),
        scale=scale.tolist(),
        coef=ridge.coef_.tolist(),
        intercept=float(ridge.intercept_),
        knots_x=knots_x.tolist(),
        knots_y=iso.predict(knots_x).tolist(),
        review_below=REVIEW_BELOW,
        fitted_on=fitted_on,
    )


def estimates(model: QualityModel, x: np.ndarray) -> np.ndarray:
    return np.array([model.estimate(dict(zip(FEATURES, row))) for row in x])


def out_of_fold(x: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Each image's estimate from a model fitted on the other folds: how the fit does on images it has not seen."""
    order = np.random.default_rng(seed).permutation(len(y))
    result = np.empty(len(y))
    for fold in np.array_split(order, folds):
        rest = np.setdiff1d(order, fold)
        result[fold] = estimates(fit(x[rest], y[rest], "fold"), x[fold])
    return result


def read_evaluations(evaluations: Sequence[Path], truth: str = "iou_source") -> tuple[np.ndarray, np.ndarray, str]:
    """Features and true Jaccard of every image of these evaluate folders, pooled, and a line saying which."""
    parts = [read_rows(Path(folder) / "per_image.csv", truth) for folder in evaluations]
    x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    return x, y, ", ".join(f"{Path(folder).name} ({len(p[1])})" for folder, p in zip(evaluations, parts))


def embed(onnx_in: Path, model: QualityModel, onnx_out: Path) -> Path:
    """A copy of an exported model with the quality estimate in its metadata (written atomically)."""
    return with_metadata(onnx_in, {}, model, onnx_out)


def with_metadata(onnx_in: Path, props: dict[str, str], quality: QualityModel | None, onnx_out: Path) -> Path:
    """A copy of an exported model with `props` set and, if given, its quality estimate replaced; the entries
    replaced go to the end, the others keep their order. Written atomically."""
    import onnx

    from lesionseg.files import write_atomically
    from lesionseg.segment.quality import METADATA_KEY

    new = props | ({METADATA_KEY: quality.to_metadata()} if quality is not None else {})
    proto = onnx.load(str(onnx_in))
    kept = [p for p in proto.metadata_props if p.key not in new]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in new.items():
        proto.metadata_props.add(key=key, value=value)
    return write_atomically(onnx_out, lambda handle: handle.write(proto.SerializeToString()), "ONNX model")


def risk_coverage_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> Path:
    """Mean and worst-decile Jaccard of the kept images against the share kept, the least trusted set aside first;
    one line per (quality, true Jaccard) pair in `curves`, with the order a perfect estimate would give."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = np.linspace(0.3, 1.0, 71)
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for label, (quality, truth) in curves.items():
        for order, style, name in ((quality, "-", label), (truth, ":", f"{label}, perfect estimate")):
            rows = risk_coverage(np.asarray(order), np.asarray(truth), shares)
            line = axes[0].plot(shares, [r["mean"] for r in rows], style, label=name)[0]
            axes[1].plot(shares, [r["worst_decile"] for r in rows], style, color=line.get_color())
    for axis, what in zip(axes, ("mean Jaccard of the kept images", "worst-decile Jaccard of the kept images")):
        axis.set_xlabel("share of images kept (least trusted set aside first)")
        axis.set_ylabel(what)
        axis.invert_xaxis()
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


class Refit(NamedTuple):
    """A model file with a newly fitted estimate, the estimate, and how it did out of fold on the rows it came from."""

    model: Path
    estimate: QualityModel
    report: dict
    out_of_fold: np.ndarray
    truth: np.ndarray


def refit(model: Path, validation: dict[str, tuple[Path, str]], out: Path) -> Refit:
    """`model` (an exported .onnx) with a quality estimate fitted on validation images: `validation` maps a name to
    (data folder, split), e.g. {"clinic": (Path("review/corrections"), "test")}; each is scored through the pipeline
    at its own resolution, the estimate fitted on the pooled rows, measured out of fold, and embedded in a copy of
    the model, out/<stem>-quality.onnx."""
    from lesionseg.train.evaluation import evaluate_checkpoint

    out.mkdir(parents=True, exist_ok=True)
    folders = []
    for name, (data, split) in validation.items():
        folders.append(out / f"eval-{name}")
        evaluate_checkpoint(model, data, split, folders[-1], source_resolution=True, progress=False)
    x, y, names = read_evaluations(folders)
    estimate, held_out = fit(x, y, names), out_of_fold(x, y)
    fitted = embed(model, estimate, out / f"{Path(model).stem}-quality.onnx")
    return (
        fitted,
        estimate,
        {"fitted_on": names, "validation_out_of_fold": quality_accuracy(held_out, y), "rows": (held_out, y)},
    )
