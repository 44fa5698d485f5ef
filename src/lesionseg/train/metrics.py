"""Segmentation scores from per-image confusion counts.

Counts (tp, fp, fn, tn) come from segmentation_models_pytorch's `get_stats`; each score is given
two ways and named for it: `*_per_image` is the mean of per-image scores (how the ISIC challenges
rank), `*_pooled` sums the counts over the whole split first.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from scipy.stats import bootstrap
from segmentation_models_pytorch.metrics import get_stats

SCORES = ("iou", "dice", "accuracy", "sensitivity", "specificity")
ISIC2018_JACCARD_THRESHOLD = 0.65  # ISIC 2018 Task 1: a per-image Jaccard below this counts as 0


def binary_counts(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,1,H,W) binary prediction and {0,1} target -> (B,4) int64 counts tp, fp, fn, tn per image."""
    tp, fp, fn, tn = get_stats(predicted.long(), target.long(), mode="binary")
    return torch.cat([tp, fp, fn, tn], dim=1)


def confusion_counts(logits: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """(B,1,H,W) logits and {0,1} targets -> (B,4) int64 counts tp, fp, fn, tn per image."""
    return binary_counts(torch.sigmoid(logits) >= threshold, target)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num/den, and 1.0 where both are 0 (an empty prediction of an empty mask is perfect)."""
    num, den = num.double(), den.double()
    return torch.where(den > 0, num / den.clamp(min=1), torch.ones_like(num))


def scores(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """(N,4) counts -> each score per row, shape (N,)."""
    tp, fp, fn, tn = counts.unbind(-1)
    return {
        "iou": _ratio(tp, tp + fp + fn),
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
    }


# The scores a result table reports of a split, by their keys in `summarize`'s result
REPORTED = (
    "iou_per_image",
    "dice_per_image",
    "accuracy_per_image",
    "sensitivity_per_image",
    "specificity_per_image",
    "thresholded_iou_per_image",
    "iou_worst_decile",
)


def summarize(counts: torch.Tensor) -> dict[str, float]:
    """Per-image means and pooled values of every score over (N,4) counts."""
    per_image = scores(counts)
    pooled = scores(counts.sum(0, keepdim=True))
    result = {}
    for name in SCORES:
        result[f"{name}_per_image"] = per_image[name].mean().item()
        result[f"{name}_pooled"] = pooled[name].item()
    iou = per_image["iou"]
    result["thresholded_iou_per_image"] = torch.where(iou < ISIC2018_JACCARD_THRESHOLD, 0.0, iou).mean().item()
    worst = iou.sort().values[: max(1, len(iou) // 10)]
    result["iou_worst_decile"] = worst.mean().item()  # how bad the hardest tenth of images is
    return result


class MetricAccumulator:
    """Collects per-image counts batch by batch, then scores the whole split at once."""

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = threshold
        self._counts: list[torch.Tensor] = []

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        self._counts.append(confusion_counts(logits.detach(), target, self.threshold))

    def update_binary(self, predicted: torch.Tensor, target: torch.Tensor) -> None:
        self._counts.append(binary_counts(predicted, target))

    @property
    def counts(self) -> torch.Tensor:
        return torch.cat(self._counts) if self._counts else torch.zeros(0, 4, dtype=torch.long)

    def compute(self) -> dict[str, float]:
        return summarize(self.counts)

    def per_image(self) -> dict[str, list[float]]:
        return {name: values.tolist() for name, values in scores(self.counts).items()}


def paired_difference(
    ours: Mapping[str, float], theirs: Mapping[str, float], draws: int = 10_000, seed: int = 0
) -> dict[str, float]:
    """Mean per-image difference ours - theirs over the same images, with a paired bootstrap 95 % interval.

    A gap between two models is only worth reporting if it is larger than the spread that comes from
    which test images happened to be drawn; resampling the per-image differences measures that spread.
    """
    if ours.keys() != theirs.keys():
        only = sorted(ours.keys() ^ theirs.keys())
        raise ValueError(f"the two were scored on different images ({len(only)} not in both, e.g. {only[0]})")
    if len(ours) < 2:
        raise ValueError("a paired difference needs at least two images")
    diff = np.array([ours[i] - theirs[i] for i in sorted(ours)])
    interval = bootstrap(
        (diff,), np.mean, n_resamples=draws, confidence_level=0.95, method="percentile", rng=np.random.default_rng(seed)
    ).confidence_interval
    return {
        "mean": float(diff.mean()),
        "ci95_low": float(interval.low),
        "ci95_high": float(interval.high),
        "ours_better": int((diff > 0).sum()),
        "theirs_better": int((diff < 0).sum()),
        "images": len(diff),
    }
