"""How the quality estimate reads on the clinic: measured on the out-of-fold rows, reported, not applied.

The estimate (`segment/quality.py`) says how far each mask can be trusted. After adapting, its error on a clinic's
masks could be corrected, but 25 out-of-fold rows are few: v3 chose among "as shipped / shifted / line" by their
own error and made one stand-in draw worse by 0.04; v4 tried one shift of the mean error, shrunk toward the shipped
calibration (n / (n + SHRINK) of it), and that still helped on some draws and hurt on others, once by 0.011
(docs/adapt.md#the-quality-estimate). The rows the shift is measured on come from the fold models, which are not
the final model, so the shift it needs is not the one they show. The adapted file therefore keeps the shipped
estimate, and adapt.json says how it reads on the clinic's own masks (its mean against their mean Jaccard).
"""

from __future__ import annotations

import numpy as np

from lesionseg.segment.quality import QualityModel, features

SHRINK = 25  # masks at which half of a measured shift would be applied (the benchmark's "if shifted")


def calibration(quality: QualityModel | None, maps: np.ndarray, threshold: float, truth: np.ndarray) -> dict:
    """The estimate on the out-of-fold maps against those masks' Jaccard: means, error, the shift they suggest."""
    if quality is None:
        return {}
    estimate = np.array([quality.estimate(features(p, threshold)) for p in maps])
    measured = float((truth - estimate).mean())
    return {
        "applied": False,
        "mean_estimate": float(estimate.mean()),
        "mean_truth": float(truth.mean()),
        "mae": float(np.abs(truth - estimate).mean()),
        "measured_shift": measured,
        "shrunk_shift": measured * len(truth) / (len(truth) + SHRINK),
    }
