"""A clinic's image/mask pairs as adapt uses them, read once, and each image's Jaccard at its own size for many
borders: thresholds, and offsets of the outline by a share of the lesion's radius (`pipeline.offset_border`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lesionseg.errors import DataError
from lesionseg.images import inspect_mask
from lesionseg.segment.pipeline import FIXED_POINT, offset_border, to_own_size
from lesionseg.segment.review import read_journal
from lesionseg.train.data import _decode, find_pairs

THRESHOLDS = tuple(np.round(np.arange(0.20, 0.801, 0.025), 3))
OFFSETS = tuple(np.round(np.arange(-0.20, 0.201, 0.02), 3))  # shares of the equivalent radius; 0 in the middle
BORDERS = tuple((offset, threshold) for offset in OFFSETS for threshold in THRESHOLDS)  # border_table's columns
SCORED_PIXELS = 2**17  # a larger truth is scored on a reduced grid: the Jaccard moves by well under 0.001


@dataclass
class Clinic:
    """A clinic's pairs: model-size images and masks for training, own-size masks for scoring."""

    ids: list[str]
    images: torch.Tensor  # (N,3,S,S) uint8
    masks: torch.Tensor  # (N,1,S,S) float in {0,1}
    truths: list[np.ndarray]  # (H,W) bool each, the image's own size
    corrected: np.ndarray  # (N,) bool: a person corrected this mask (review.jsonl), or the folder says nothing

    def subset(self, index: np.ndarray) -> Clinic:
        """The pairs at `index`, in that order."""
        return Clinic(
            [self.ids[i] for i in index],
            self.images[index],
            self.masks[index],
            [self.truths[i] for i in index],
            self.corrected[index],
        )


def load_clinic(data: str | Path, size: int) -> Clinic:
    """Every pair of DIR (images/ + masks/, or any layout `train` reads); a bad pair stops adapt in one line."""
    pairs, problems = find_pairs(data, "train")
    if problems:
        raise DataError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    cached = _decode(pairs, size)
    if cached.skipped:
        raise DataError(
            cached.skipped[0] + (f" (and {len(cached.skipped) - 1} more)" if len(cached.skipped) > 1 else "")
        )
    by_id = {pair.id: pair for pair in pairs}
    truths = [inspect_mask(by_id[image_id].mask)[0] for image_id in cached.ids]
    return Clinic(cached.ids, cached.images, cached.masks.float(), truths, corrected_flags(data, cached.ids))


def corrected_flags(data: str | Path, ids: list[str]) -> np.ndarray:
    """Which masks a person corrected, where DATA is a review folder (its review.jsonl says); all of them where it
    is any other data folder. A mask accepted as the model drew it is the model's own output: it teaches no style."""
    saved = read_journal(Path(data))
    if not saved:
        return np.ones(len(ids), bool)
    return np.array([saved.get(image_id, {}).get("action") != "accepted" for image_id in ids])


def scoring_grid(truth: np.ndarray) -> np.ndarray:
    """The truth itself, or (past SCORED_PIXELS) sampled nearest on a grid of about that many pixels."""
    factor = math.ceil(math.sqrt(truth.size / SCORED_PIXELS))
    return truth if factor == 1 else truth[factor // 2 :: factor, factor // 2 :: factor]


def jaccard_table(maps: np.ndarray, truths: list[np.ndarray], thresholds=THRESHOLDS) -> np.ndarray:
    """(N, T): each image's Jaccard at its own size (the resize `predict` does) at each threshold."""
    table = np.empty((len(truths), len(thresholds)))
    cuts = np.asarray(thresholds) * FIXED_POINT
    for n, (p, truth) in enumerate(zip(maps, truths)):
        truth = scoring_grid(truth)
        fixed = to_own_size(p, truth.shape[1], truth.shape[0]).ravel()
        everything, lesion = np.sort(fixed), np.sort(fixed[truth.ravel()])
        predicted = len(everything) - np.searchsorted(everything, cuts, "left")
        hit = len(lesion) - np.searchsorted(lesion, cuts, "left")
        union = predicted + len(lesion) - hit
        table[n] = np.where(union > 0, hit / np.maximum(union, 1), 1.0)
    return table


def border_table(maps: np.ndarray, truths: list[np.ndarray]) -> np.ndarray:
    """(N, len(BORDERS)): each image's Jaccard for every (offset, threshold) pair, in BORDERS' order."""
    tables = [jaccard_table(np.stack([offset_border(p, offset) for p in maps]), truths) for offset in OFFSETS]
    return np.concatenate(tables, axis=1)


def border_index(offset: float, threshold: float) -> int:
    """The BORDERS column nearest to (offset, threshold)."""
    offsets, thresholds = np.asarray(OFFSETS), np.asarray(THRESHOLDS)
    return int(np.argmin(np.abs(offsets - offset))) * len(thresholds) + int(np.argmin(np.abs(thresholds - threshold)))
