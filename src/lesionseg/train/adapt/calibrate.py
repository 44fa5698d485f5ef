"""The quality estimate, recalibrated to the clinic: one number, shrunk toward the shipped calibration.

25 out-of-fold rows are few for even a line: choosing among "as shipped / shifted / line" by their own error
helped on average and made one stand-in draw worse by 0.04 (docs/adapt.md). So one free parameter, the mean error
of the estimate on the clinic's masks, and only part of it: n / (n + SHRINK) of the shift (half of it at 25
masks, nine tenths at 225), the usual shrinkage of a mean estimated from few rows toward a prior (the shipped
estimate, fitted on thousands of ISIC rows). Rank order is untouched.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from lesionseg.segment.quality import QualityModel, features

SHRINK = 25  # masks at which half of the measured shift is applied


def recalibrated(quality: QualityModel | None, maps: np.ndarray, threshold: float, truth: np.ndarray):
    """The estimate shifted by the shrunk mean error on out-of-fold rows, and what was measured."""
    if quality is None:
        return None, {}
    estimate = np.array([quality.estimate(features(p, threshold)) for p in maps])
    measured = float((truth - estimate).mean())
    shift = measured * len(truth) / (len(truth) + SHRINK)
    knots = np.clip(np.asarray(quality.knots_y) + shift, 0, 1).tolist()
    note = f"{quality.fitted_on}; shifted {shift:+.3f} on {len(truth)} clinic masks (measured {measured:+.3f})"
    report = {
        "shift": shift,
        "measured_shift": measured,
        "mean_estimate_before": float(estimate.mean()),
        "mean_truth": float(truth.mean()),
    }
    return replace(quality, knots_y=knots, fitted_on=note[:500]), report
