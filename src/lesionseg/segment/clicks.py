"""Click to correct: the annotator's clicks and the previous mask in, a refined mask out (no PyTorch).

The click model is the released U-Net with three more input channels (RITM's recipe, "Reviving Iterative
Training with Mask Guidance", Sofiiuk et al. 2022): positive clicks, negative clicks (each a disk of
CLICK_RADIUS pixels at the model's size) and the previous mask. A positive click adds what the model missed, a
negative one removes what it took; the model finds the border. Training (`lesionseg.train.clicks`) and the
benchmark place clicks by the standard protocol implemented here once (`next_click`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from lesionseg.errors import DataError

CLICK_RADIUS = 3  # pixels at the model's size (128): a click marks a spot, not a region
MAX_CLICKS = 100  # more clicks than this on one image is a script gone wrong, not an annotator
GUIDE_CHANNELS = 3  # positive clicks, negative clicks, previous mask

Point = tuple[float, float]  # (x, y) in the image's own pixels


def checked_points(points: Sequence[Point] | None, width: int, height: int, what: str) -> list[Point]:
    """Clicks as (x, y) inside the image; anything else is one line saying which click and why."""
    checked = []
    for n, point in enumerate(points or []):
        try:
            x, y = (float(v) for v in point)
        except (TypeError, ValueError):
            raise DataError(f"{what} click {n + 1}: {str(point)[:40]!r} is not an (x, y) pair") from None
        if not (np.isfinite(x) and np.isfinite(y)):
            raise DataError(f"{what} click {n + 1}: ({x}, {y}) is not a finite point")
        if not (0 <= x < width and 0 <= y < height):
            raise DataError(f"{what} click {n + 1}: ({x:g}, {y:g}) is outside the {width}x{height} image")
        checked.append((x, y))
    return checked


def click_maps(positive: Sequence[Point], negative: Sequence[Point], width: int, height: int, size: int) -> np.ndarray:
    """(2,S,S) float32: a disk at each click, placed where the click falls on the model's S x S grid."""
    maps = np.zeros((2, size, size), np.float32)
    yy, xx = np.mgrid[:size, :size]
    for channel, points in enumerate((positive, negative)):
        for x, y in points:
            cx, cy = (x + 0.5) * size / width - 0.5, (y + 0.5) * size / height - 0.5
            maps[channel][(xx - cx) ** 2 + (yy - cy) ** 2 <= CLICK_RADIUS**2] = 1.0
    return maps


def next_click(predicted: np.ndarray, truth: np.ndarray) -> tuple[tuple[int, int], bool] | None:
    """The standard protocol's next click (RITM, f-BRS): in the larger error region (missed lesion, or extra),
    at its point farthest from its border; positive on a miss. None where the mask is already exact."""
    missed, extra = truth & ~predicted, predicted & ~truth
    if not (missed.any() or extra.any()):
        return None
    depth = {}
    for name, error in (("missed", missed), ("extra", extra)):
        padded = np.pad(error, 1)  # the image's edge counts as a border
        depth[name] = ndimage.distance_transform_edt(padded)[1:-1, 1:-1]
    positive = depth["missed"].max() >= depth["extra"].max()
    chosen = depth["missed" if positive else "extra"]
    row, col = np.unravel_index(int(np.argmax(chosen)), chosen.shape)
    return (int(col), int(row)), bool(positive)


def previous_mask(mask: np.ndarray | None, size: int) -> np.ndarray:
    """(S,S) float32 0/1: the mask the clicks correct, sampled to the model's grid (none: all zero)."""
    if mask is None:
        return np.zeros((size, size), np.float32)
    from PIL import Image

    small = Image.fromarray(np.asarray(mask, bool).astype(np.uint8) * 255).resize(
        (size, size), Image.Resampling.BILINEAR
    )
    return (np.asarray(small) >= 128).astype(np.float32)


class ClickModel:
    """The exported click model in onnxruntime: (image, guide) -> lesion probability, all at the model's size."""

    def __init__(self, path: str | Path) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 0
        self.path = Path(path)
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise DataError(f"{self.path}: not a click model onnxruntime can run ({exc.__class__.__name__})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("kind") != "clicks":
            raise DataError(f"{self.path}: not a lesionseg click model (its metadata says no 'kind: clicks')")
        self.image_size = int(meta["image_size"])
        self.threshold = float(meta.get("threshold", 0.5))
        self.name, self.version = meta.get("name", "clicks"), meta.get("version", "?")

    def __call__(self, pixels: np.ndarray, guide: np.ndarray) -> np.ndarray:
        """(3,S,S) uint8 and (3,S,S) float32 -> (S,S) float32 probability."""
        image = pixels[None].astype(np.float32) / 255
        return self.session.run(None, {"image": image, "guide": guide[None].astype(np.float32)})[0][0, 0]


CLICK_MODEL_ENV = "LESIONSEG_CLICK_MODEL"  # a click model other than the shipped one (a training run's clicks.onnx)


def click_model_path() -> Path:
    """$LESIONSEG_CLICK_MODEL, else the click model shipped beside the release; one line where there is none."""
    from importlib import resources

    if os.environ.get(CLICK_MODEL_ENV):
        return Path(os.environ[CLICK_MODEL_ENV])
    path = Path(str(resources.files("lesionseg.segment").joinpath("release", "lesionseg-clicks.onnx")))
    if not path.is_file():
        raise DataError(
            f"this version ships no click model; train one (`lesionseg train-clicks`) and set {CLICK_MODEL_ENV}"
        )
    return path


def parsed_points(text: str, what: str) -> list[Point]:
    """'x,y;x,y' (the page's query) -> [(x, y), ...]; the bounds are checked against the image later."""
    points = []
    for n, pair in enumerate(filter(None, text.split(";"))):
        try:
            x, y = (float(v) for v in pair.split(","))
        except ValueError:
            raise DataError(f"{what} click {n + 1}: {pair[:40]!r} is not x,y") from None
        points.append((x, y))
        if len(points) > MAX_CLICKS:
            raise DataError(f"more than {MAX_CLICKS} {what} clicks on one image")
    return points


class Clicker:
    """Clicks on one image after another, as the review page sends them: the click model loaded once, each image's
    model-size pixels kept for its next clicks (decoding a 6 MP photo costs more than the model)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.model: ClickModel | None = None
        self.cached: tuple[Path, np.ndarray, tuple[int, int]] | None = None

    def pixels(self, image_path: Path, size: int) -> tuple[np.ndarray, tuple[int, int]]:
        if self.cached is None or self.cached[0] != image_path:
            from lesionseg.segment.pipeline import model_input, read_for_model

            image, own, _ = read_for_model(image_path, str(image_path), size)
            self.cached = (image_path, model_input(image, size), own)
        return self.cached[1], self.cached[2]

    @property
    def image_size(self) -> int:
        if self.model is None:
            self.model = ClickModel(self.path or click_model_path())
        return self.model.image_size

    def corrected(self, pixels: np.ndarray, own: tuple[int, int], positive, negative, mask) -> np.ndarray:
        """(S,S) probability of the mask corrected by the clicks ((x, y) in the image's own pixels)."""
        size, (width, height) = self.image_size, own
        points = (
            checked_points(positive, width, height, "positive"),
            checked_points(negative, width, height, "negative"),
        )
        if sum(map(len, points)) > MAX_CLICKS:
            raise DataError(f"{sum(map(len, points))} clicks on one image; at most {MAX_CLICKS}")
        if mask is not None and np.asarray(mask).shape != (height, width):
            raise DataError(
                f"the mask is {np.asarray(mask).shape[1]}x{np.asarray(mask).shape[0]}, the image {width}x{height}"
            )
        guide = np.concatenate([click_maps(*points, width, height, size), previous_mask(mask, size)[None]])
        return self.model(pixels, guide)

    def probability(self, image_path: Path, positive, negative, mask) -> tuple[np.ndarray, tuple[int, int]]:
        """The review page's click: the image read once for all its clicks."""
        pixels, own = self.pixels(image_path, self.image_size)
        return self.corrected(pixels, own, positive, negative, mask), own
