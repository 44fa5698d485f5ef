"""One path from image to mask, shared by evaluate, the report, predict, serve and the Python API:

    read (reduced as it is decoded) -> model input (one resize) -> predictor, averaged over test-time views
    -> back to the image's own size (one resize) -> refinements (largest component, hole filling) -> mask

A predictor maps uint8 images (B,3,S,S) at the model's size to lesion probabilities (B,1,S,S) as NumPy arrays
(`lesionseg.segment.predictors`). No PyTorch here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np
from PIL import Image
from scipy import ndimage

from lesionseg.images import decode
from lesionseg.segment.descriptors import describe as describe_lesion
from lesionseg.segment.quality import Quality, QualityModel, assess


class Predictor(Protocol):
    image_size: int
    threshold: float
    name: str  # what the page and the API show: which model answered
    version: str

    def __call__(self, images: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class Refinements:
    tta: bool = False  # average over identity, horizontal and vertical flips
    rotations: bool = False  # also the 90/180/270 degree turns (a dermoscope has no "up"); with tta, all 8 symmetries
    largest_component: bool = False  # a dermoscopy image shows one lesion
    fill_holes: bool = False  # a lesion has no holes

    @property
    def views(self) -> list[tuple[int, bool]]:
        return inference_views(self.tta, self.rotations)

    @property
    def name(self) -> str:
        on = [k for k, v in asdict(self).items() if v]
        return "+".join(on) if on else "plain"


def inference_views(flips: bool = False, rotations: bool = False) -> list[tuple[int, bool]]:
    """The test-time views as (quarter turns, mirrored first). Flips alone are the original three views
    (identity, mirror, and vertical flip = half turn of the mirror); rotations give the four quarter turns
    (a dermoscope has no "up"), and with flips also their mirrors: all eight symmetries of the square."""
    if rotations:
        return [(turns, mirrored) for mirrored in ((False, True) if flips else (False,)) for turns in range(4)]
    return [(0, False), (0, True), (2, True)] if flips else [(0, False)]


def average_over_views(
    run: Callable[[np.ndarray], np.ndarray], images: np.ndarray, views: list[tuple[int, bool]]
) -> np.ndarray:
    """uint8 (B,3,S,S) -> the mean of `run`'s (B,1,S,S) probabilities over the views, each turned back."""
    total = None
    for turns, mirrored in views:
        view = np.rot90(images[..., ::-1] if mirrored else images, turns, axes=(-2, -1))
        probability = np.rot90(run(np.ascontiguousarray(view)), -turns, axes=(-2, -1))
        probability = probability[..., ::-1] if mirrored else probability
        total = probability.astype(np.float32) if total is None else total + probability
    return np.ascontiguousarray(total / len(views))


class ViewAveraged:
    """A predictor whose answer is the mean over test-time views: flip TTA costs 3 model calls per image, all
    eight symmetries 8. It is a predictor itself, so a batching server can wrap it as any other."""

    def __init__(self, predictor: Predictor, views: list[tuple[int, bool]]) -> None:
        self.predictor, self.views = predictor, views
        self.image_size, self.threshold = predictor.image_size, predictor.threshold
        self.name, self.version = predictor.name, predictor.version

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return average_over_views(self.predictor, images, self.views)


def with_views(predictor: Predictor, refine: Refinements) -> Predictor:
    """The predictor itself when no view is asked for, else averaged over the views."""
    views = refine.views
    return predictor if len(views) == 1 else ViewAveraged(predictor, views)


def read_for_model(source: Path | BinaryIO, name: str, size: int) -> tuple[Image.Image, tuple[int, int], list[str]]:
    """An RGB image decoded only as large as a model of `size` px needs (JPEG DCT scaling keeps both sides at
    least 2 x size, so the one resize below still antialiases), its (width, height) at full size, and what was
    converted. Memory is bounded by the reduced size, not the file's. Training's cache reads through here too."""
    image, notes, full_size = decode(source, name, 2 * size)
    return image, full_size, notes


def model_input(image: Image.Image, size: int) -> np.ndarray:
    """uint8 (3,S,S): the one resize to the model's size (Pillow's bilinear, antialiased when shrinking),
    used for training's cache and for every prediction alike."""
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image).transpose(2, 0, 1)


FIXED_POINT = 2**24  # probabilities in units of 2**-24: float32's precision, and Pillow resizes int32 2.5x faster


def as_fixed(probability: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] -> int32 in units of 1/FIXED_POINT (exact back to float32)."""
    return np.rint(probability * FIXED_POINT).astype(np.int32)


def as_probability(fixed: np.ndarray) -> np.ndarray:
    return fixed.astype(np.float32) * (1 / FIXED_POINT)


def to_own_size(probability: np.ndarray, width: int, height: int) -> np.ndarray:
    """(S,S) probabilities -> (height,width) int32 in units of 1/FIXED_POINT, bilinear on pixel centres: the one
    resize back. In fixed point because for a 1.7 MP image this resize is most of what predict spends beside
    the model and its codecs (benchmarks/README.md, "predict end to end")."""
    fixed = as_fixed(probability)
    if fixed.shape == (height, width):
        return fixed
    return np.asarray(Image.fromarray(fixed).resize((width, height), Image.Resampling.BILINEAR))


def offset_border(probability: np.ndarray, offset: float) -> np.ndarray:
    """(S,S) probabilities whose outline lies `offset` times the lesion's equivalent radius (of its p >= 0.5 area)
    further out (+) or in (-): a clinic whose annotators draw tighter or looser than ours, the one-number style
    `adapt` fits beside the threshold. A grey erosion or dilation (it commutes with thresholding, so the map
    keeps its soft edge for the resize and the review page's slider) by an octagon of that radius, built from
    one-pixel steps alternating a 3x3 square and a cross: milliseconds where a disc footprint of radius 15 takes
    a hundred."""
    if offset == 0:
        return probability
    steps = round(abs(offset) * math.sqrt(np.count_nonzero(probability >= 0.5) / math.pi))
    grey = ndimage.grey_erosion if offset < 0 else ndimage.grey_dilation
    for step in range(steps):
        probability = grey(probability, footprint=CROSS) if step % 2 else grey(probability, size=(3, 3))
    return probability


CROSS = ndimage.generate_binary_structure(2, 1)


def refined_mask(probability: np.ndarray, threshold: float, refine: Refinements) -> np.ndarray:
    """(H,W) probabilities (any scale the threshold shares) -> boolean mask, post-processed as asked."""
    mask = probability >= threshold
    if refine.largest_component and mask.any():
        labels, count = ndimage.label(mask)
        if count > 1:
            sizes = ndimage.sum_labels(mask, labels, index=range(1, count + 1))
            mask = labels == 1 + int(np.argmax(sizes))
    if refine.fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    return mask


@dataclass
class Segmentation:
    """One image's result at its own resolution: boolean mask and probabilities, both (H,W), and the estimate of
    the mask's quality when the model ships one (`lesionseg.segment.quality`)."""

    mask: np.ndarray
    fixed: np.ndarray  # (H,W) int32: the probabilities in units of 1/FIXED_POINT, as they were resized
    name: str = ""
    assessed: Quality | None = None
    descriptors: dict[str, Any] | None = None  # size, asymmetry, border, colours (`lesionseg.segment.descriptors`)

    @property
    def probability(self) -> np.ndarray:
        """(H,W) float32 lesion probabilities, made on request: predict and serve need only the mask."""
        return as_probability(self.fixed)

    @property
    def quality(self) -> float | None:
        """Estimated Jaccard of the mask against an expert's (None: the model ships no estimate)."""
        return self.assessed.quality if self.assessed else None

    @property
    def needs_review(self) -> bool | None:
        """True where the estimate is below the model's review threshold: look at this mask."""
        return self.assessed.needs_review if self.assessed else None

    @property
    def stats(self) -> dict[str, Any]:
        """The numbers `predict` writes for the image."""
        return describe(self.name, self)


class Pipeline:
    """A predictor with its test-time views and refinements: images in, masks at their own size out."""

    def __init__(
        self,
        predictor: Predictor,
        refine: Refinements = Refinements(),
        views_inside: bool = False,
        quality: QualityModel | None = None,
    ) -> None:
        """`views_inside`: `predictor` already averages over `refine`'s views (a server batches them together);
        `quality`: the quality model, where `predictor` is a wrapper that does not carry its model's."""
        self.refine = refine
        self.predictor = predictor if views_inside else with_views(predictor, refine)
        self.image_size, self.threshold = predictor.image_size, predictor.threshold
        self.name, self.version = predictor.name, predictor.version
        self.sha256: str = getattr(predictor, "sha256", "")  # the model file's hash: which model made a result
        self.quality: QualityModel | None = quality or getattr(predictor, "quality", None)
        self.border_offset: float = getattr(predictor, "border_offset", 0.0)  # a clinic's style, fitted by adapt

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B,3,S,S) -> view-averaged probabilities (B,1,S,S) float32, as one batch."""
        return np.asarray(self.predictor(images), dtype=np.float32)

    def mask(self, probability: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """(S,S) probabilities -> the refined mask at `size` = (width, height)."""
        return self.result(probability, size, assessed=False).mask

    def result(
        self, probability: np.ndarray, size: tuple[int, int], name: str = "", assessed: bool = True
    ) -> Segmentation:
        """(S,S) probabilities -> the image's Segmentation at `size` = (width, height), with its quality estimate."""
        probability = offset_border(probability, self.border_offset)
        fixed = to_own_size(probability, *size)
        mask = refined_mask(fixed, self.threshold * FIXED_POINT, self.refine)
        quality = assess(self.quality, probability, self.threshold) if assessed else None
        return Segmentation(mask, fixed, name, quality)

    def segment(
        self, images: list[Image.Image], names: list[str] | None = None, sizes: list[tuple[int, int]] | None = None
    ) -> list[Segmentation]:
        """Each image to the model's size, one batch through the model, each result back to its own size: its
        (width, height) in `sizes` when it was decoded reduced (`read_for_model`)."""
        batch = np.stack([model_input(image, self.image_size) for image in images])
        results = []
        for n, (image, p) in enumerate(zip(images, self.probabilities(batch))):
            result = self.result(p[0], sizes[n] if sizes else image.size, names[n] if names else "")
            result.descriptors = describe_lesion(image, result.mask)
            results.append(result)
        return results


def describe(name: str, result: Segmentation) -> dict[str, Any]:
    """The numbers a user asks of one image: lesion area, bounding box, mean lesion probability, and the estimated
    quality of the mask with its review flag (empty when the model ships no estimate)."""
    mask = result.mask
    height, width = mask.shape
    area = int(mask.sum())
    row: dict[str, Any] = {
        "file": name,
        "width": width,
        "height": height,
        "lesion_pixels": area,
        "lesion_fraction": area / (width * height),
    }
    if area:  # the box from the rows and columns that hold lesion: no coordinate list of every pixel
        rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        row.update(
            bbox_x0=int(columns[0]),
            bbox_y0=int(rows[0]),
            bbox_x1=int(columns[-1]),
            bbox_y1=int(rows[-1]),
            mean_probability=float(result.fixed.sum(where=mask, dtype=np.int64)) / FIXED_POINT / area,
        )
    else:
        row.update(bbox_x0=None, bbox_y0=None, bbox_x1=None, bbox_y1=None, mean_probability=None)
    row.update(quality=result.quality, review=result.needs_review)
    return row
