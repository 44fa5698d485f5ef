"""Which masks to check: a per-image estimate of the mask's Jaccard against an expert's, from what the model itself
produced. No extra model call and no PyTorch: a handful of numbers read off the probability map at the model's
size (how sharp it is, how much of it is undecided, the mask's shape), mapped to a Jaccard estimate by a small
fitted model whose parameters ship inside the exported model (metadata key "quality"; fitted by
`lesionseg.train.qualityfit` on validation images only, as a step of the release build).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

METADATA_KEY = "quality"
REVIEW_BELOW = 0.7  # an estimated Jaccard below this flags the mask for review (the "poor" masks)
FEATURES = (
    "soft_jaccard",
    "undecided",
    "inside",
    "outside",
    "area",
    "components",
    "largest_share",
    "border",
    "compactness",
    "holes",
)
MAX_METADATA = 20_000  # characters: the fitted model is a few hundred numbers


def features(probability: np.ndarray, threshold: float) -> dict[str, float]:
    """(S,S) probabilities at the model's size -> the numbers the estimate reads.

    soft_jaccard: Jaccard between the probabilities and their own mask (1: every pixel decided); undecided: pixels
    with 0.2 < p < 0.8 per mask pixel; inside / outside: mean probability in and around the mask; area: mask share
    of the image; components: how many pieces; largest_share: the largest piece's share; border: share of the
    frame the mask touches; compactness: 4 pi area / perimeter^2; holes: enclosed background per mask pixel.
    """
    p = np.asarray(probability, dtype=np.float32)
    mask = p >= threshold
    area = int(mask.sum())
    union = float(np.maximum(p, mask).sum())
    labels, count = ndimage.label(mask)
    largest = int(np.bincount(labels.ravel())[1:].max()) if count else 0
    frame = np.concatenate([mask[0], mask[-1], mask[1:-1, 0], mask[1:-1, -1]])
    perimeter = area - int(ndimage.binary_erosion(mask).sum())
    ring = ndimage.binary_dilation(mask, iterations=max(1, p.shape[0] // 32)) & ~mask
    return {
        "soft_jaccard": float((p * mask).sum()) / union if union else 0.0,
        "undecided": float(((p > 0.2) & (p < 0.8)).sum()) / max(area, 1),
        "inside": float(p[mask].mean()) if area else 0.0,
        "outside": float(p[ring].mean()) if ring.any() else 0.0,
        "area": area / mask.size,
        "components": math.log1p(count),
        "largest_share": largest / area if area else 0.0,
        "border": float(frame.mean()),
        "compactness": min(1.0, 4 * math.pi * area / perimeter**2) if perimeter else 0.0,
        "holes": float(ndimage.binary_fill_holes(mask).sum() - area) / max(area, 1),
    }


@dataclass(frozen=True)
class QualityModel:
    """Standardized features -> linear score -> isotonic map to a Jaccard estimate in [0, 1]."""

    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    knots_x: list[float]  # the isotonic map, increasing in x
    knots_y: list[float]
    review_below: float = REVIEW_BELOW
    fitted_on: str = ""
    features: tuple[str, ...] = FEATURES

    def estimate(self, values: dict[str, float]) -> float:
        x = (np.array([values[name] for name in self.features]) - self.mean) / self.scale
        score = float(x @ np.asarray(self.coef) + self.intercept)
        return float(np.clip(np.interp(score, self.knots_x, self.knots_y), 0.0, 1.0))

    def to_metadata(self) -> str:
        return json.dumps(asdict(self) | {"features": list(self.features)}, allow_nan=False)

    def check_numbers(self) -> None:
        """Every parameter a finite number, each scale positive, the review line in [0, 1]: a NaN here would
        answer "quality NaN, no review needed" for every mask."""
        numbers = [*self.mean, *self.scale, *self.coef, self.intercept, *self.knots_x, *self.knots_y]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers):
            raise ValueError("a parameter is not a finite number")
        if min(self.scale) <= 0:
            raise ValueError("a feature scale is not positive")
        below = self.review_below
        if isinstance(below, bool) or not isinstance(below, (int, float)) or not 0 <= below <= 1:
            raise ValueError(f"review_below {str(below)[:20]!r} is not a number in [0, 1]")

    @classmethod
    def from_metadata(cls, text: str | None) -> QualityModel | None:
        """The model's fitted estimate, or None when it has none; a damaged one is refused (ValueError)."""
        if not text:
            return None
        if len(text) > MAX_METADATA:
            raise ValueError(f"metadata {METADATA_KEY} is {len(text):,} characters; at most {MAX_METADATA:,}")
        try:
            fields = json.loads(text)
            model = cls(**fields | {"features": tuple(fields["features"])})
            widths = {len(model.mean), len(model.scale), len(model.coef)}
            knots_ok = len(model.knots_x) == len(model.knots_y) >= 2 and np.all(np.diff(model.knots_x) >= 0)
            if widths != {len(model.features)} or not set(model.features) <= set(FEATURES) or not knots_ok:
                raise ValueError("inconsistent sizes or unknown features")
            model.check_numbers()
        except (TypeError, KeyError, ValueError, AttributeError) as exc:
            raise ValueError(f"metadata {METADATA_KEY} is not a lesionseg quality model ({exc})") from None
        return model


@dataclass(frozen=True)
class Quality:
    """One mask's estimate: `quality` ~ its Jaccard against an expert's mask; `needs_review` when it is low."""

    quality: float
    needs_review: bool


def assess(model: QualityModel | None, probability: np.ndarray, threshold: float) -> Quality | None:
    """The estimate for one (S,S) probability map, or None for a model that ships no quality model."""
    if model is None:
        return None
    value = model.estimate(features(probability, threshold))
    return Quality(round(value, 4), value < model.review_below)
