"""How well a quality estimate works on images whose true Jaccard is known: rank correlation, error, how well it
finds the poor masks, and what setting the least trusted aside buys (evaluate reports it, qualityfit fits by it)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.stats import spearmanr

from lesionseg.segment.quality import REVIEW_BELOW

POOR = 0.7  # a mask with Jaccard below this is one the flag should find
COVERAGES = (1.0, 0.95, 0.9, 0.8, 0.7, 0.5)


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a positive (a poor mask) gets a lower quality than a negative (scikit-learn's ROC AUC)."""
    from sklearn.metrics import roc_auc_score

    if positive.all() or not positive.any():
        return math.nan
    return float(roc_auc_score(positive, -np.asarray(scores)))


def worst_decile(values: np.ndarray) -> float:
    worst = np.sort(values)[: max(1, math.ceil(len(values) / 10))]
    return float(worst.mean())


def risk_coverage(quality: np.ndarray, truth: np.ndarray, coverages: Sequence[float] = COVERAGES) -> list[dict]:
    """Mean and worst-decile Jaccard of the images kept when the least trusted are set aside first."""
    order = np.argsort(-quality, kind="stable")
    rows = []
    for share in coverages:
        kept = truth[order[: max(1, round(share * len(truth)))]]
        rows.append({"coverage": share, "mean": float(kept.mean()), "worst_decile": worst_decile(kept)})
    return rows


def quality_accuracy(quality: Sequence[float], truth: Sequence[float]) -> dict:
    """How well the estimate works on these images: rank correlation, error, how well it finds poor masks."""
    q, t = np.asarray(quality, dtype=float), np.asarray(truth, dtype=float)
    return {
        "images": len(t),
        "spearman": float(spearmanr(q, t).statistic),
        "mae": float(np.abs(q - t).mean()),
        f"auroc_below_{POOR}": auroc(q, t < POOR),
        "flagged_share": float((q < REVIEW_BELOW).mean()),
        "poor_share": float((t < POOR).mean()),
        "risk_coverage": risk_coverage(q, t),
    }
