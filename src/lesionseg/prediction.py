"""Segment new images: the Python API (`lesionseg.load(...).segment(...)`), and `predict`'s files.

A predictor maps uint8 images (B,3,S,S) at the model's size to lesion probabilities (B,1,S,S) as NumPy
arrays; everything else (reading, resizing back to each image's own size, statistics, outlines) is shared.
No PyTorch at module level: with an ONNX model, the released one included, inference needs only
onnxruntime, Pillow, NumPy and SciPy.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import resources
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Callable, Protocol, Union

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm.auto import tqdm

from lesionseg.errors import DataError, LesionsegError
from lesionseg.images import IMAGE_SUFFIXES, decode_image

OUTLINE_RGB = (0, 255, 0)
RELEASED_MODEL = "release/lesionseg-unet.onnx"  # inside the package; see MODEL_CARD.md
ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]


class Predictor(Protocol):
    image_size: int
    threshold: float
    name: str  # what the page and the API show: which model answered
    version: str

    def __call__(self, images: np.ndarray) -> np.ndarray: ...


class TorchPredictor:
    """A trained checkpoint, rebuilt from its stored config (PyTorch is imported only here)."""

    def __init__(self, checkpoint: str | os.PathLike, channels_last: bool = False) -> None:
        from lesionseg.training import load_checkpoint, model_from_checkpoint

        state = load_checkpoint(checkpoint)
        self.model, config = model_from_checkpoint(state)
        self.image_size, self.threshold = config.image_size, config.threshold
        self.name = config.model_name
        self.version = f"{Path(checkpoint).name}, epoch {state['epoch']}, lesionseg {state.get('info', {}).get('lesionseg', '?')}"
        self.channels_last = channels_last
        if channels_last:
            import torch

            self.model = self.model.to(memory_format=torch.channels_last)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        import torch

        from lesionseg.data import normalize

        with torch.inference_mode():
            x = normalize(torch.from_numpy(np.array(images)))  # a copy: arrays from Pillow are read-only
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return torch.sigmoid(self.model(x)).numpy()


class OnnxPredictor:
    """An exported model run by onnxruntime; size, threshold, name and version come from the file's metadata."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise LesionsegError(f"{path}: ONNX model not found")
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own types for a foreign or damaged file
            raise LesionsegError(f"{path}: not a readable ONNX model ({exc.__class__.__name__})") from None
        self.metadata = self.session.get_modelmeta().custom_metadata_map
        if "image_size" not in self.metadata:
            raise LesionsegError(f"{path}: not exported by lesionseg (no image_size in its metadata)")
        self.image_size, self.threshold = int(self.metadata["image_size"]), float(self.metadata["threshold"])
        self.name = self.metadata.get("name", f"{self.metadata.get('arch', 'model')} ({self.image_size} px)")
        self.version = self.metadata.get("version", path.name)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = np.asarray(images, dtype=np.float32) / 255
        return self.session.run(None, {"image": x})[0]


def inference_views(flips: bool = False, rotations: bool = False) -> list[tuple[int, bool]]:
    """The test-time views as (quarter turns, mirrored first). Flips alone are the original three views
    (identity, mirror, and vertical flip = half turn of the mirror); rotations give the four quarter turns
    (a dermoscope has no "up"), and with flips also their mirrors: all eight symmetries of the square."""
    if rotations:
        return [(turns, mirrored) for mirrored in ((False, True) if flips else (False,)) for turns in range(4)]
    return [(0, False), (0, True), (2, True)] if flips else [(0, False)]


def average_over_views(run: Callable[[np.ndarray], np.ndarray], images: np.ndarray,
                       views: list[tuple[int, bool]]) -> np.ndarray:
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
    eight symmetries 8. It is a predictor itself, so predict, serve and the API take it as is."""

    def __init__(self, predictor: Predictor, views: list[tuple[int, bool]]) -> None:
        self.predictor, self.views = predictor, views
        self.image_size, self.threshold = predictor.image_size, predictor.threshold
        self.name, self.version = predictor.name, predictor.version

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return average_over_views(self.predictor, images, self.views)


def with_views(predictor: Predictor, flips: bool = False, rotations: bool = False) -> Predictor:
    """The predictor itself when no view is asked for, else averaged over the views."""
    views = inference_views(flips, rotations)
    return predictor if len(views) == 1 else ViewAveraged(predictor, views)


def released_model() -> Path:
    """The model that ships inside the package (ONNX, metadata inside)."""
    path = Path(str(resources.files("lesionseg").joinpath(RELEASED_MODEL)))
    if not path.is_file():
        raise LesionsegError(f"{path}: the released model is missing from this installation; "
                             "pass --checkpoint or --onnx, or reinstall lesionseg")
    return path


def load_predictor(checkpoint: str | os.PathLike | None = None, onnx: str | os.PathLike | None = None,
                   backend: str = "torch") -> Predictor:
    """A checkpoint, an ONNX file (onnxruntime), or with neither the released model. A checkpoint runs in
    PyTorch, or with backend "onnxruntime" exported and run there ("auto": onnxruntime if installed)."""
    if checkpoint and onnx:
        raise LesionsegError("give either --checkpoint CKPT or --onnx MODEL, not both")
    if not checkpoint:
        return OnnxPredictor(onnx or released_model())
    if backend == "onnxruntime" or (backend == "auto" and find_spec("onnxruntime") is not None):
        return exported_predictor(checkpoint)
    return TorchPredictor(checkpoint)


def exported_predictor(checkpoint: str | os.PathLike) -> OnnxPredictor:
    """The checkpoint exported to a temporary ONNX file and loaded by onnxruntime (the file is not kept).
    The export runs in a child process, so PyTorch never enters this one: a server holds ~0.3 GB, not ~1.3."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        done = subprocess.run([sys.executable, "-m", "lesionseg", "export", "--checkpoint", str(checkpoint),
                               "--onnx", str(path)], capture_output=True, text=True)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or [f"export failed with status {done.returncode}"]
            raise LesionsegError(lines[-1].removeprefix("lesionseg: error: "))
        return OnnxPredictor(path)


@dataclass
class Segmentation:
    """One image's result at its own resolution: boolean mask and probabilities, both (H,W)."""

    mask: np.ndarray
    probability: np.ndarray
    name: str = ""

    @property
    def stats(self) -> dict[str, Any]:
        """The numbers `predict` writes for the image."""
        return describe(self.name, self)


def model_input(image: Image.Image, size: int) -> np.ndarray:
    """uint8 (3,S,S): Pillow's bilinear resize, antialiased when shrinking like the training cache's."""
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR)).transpose(2, 0, 1)


def to_own_size(probability: np.ndarray, width: int, height: int) -> np.ndarray:
    """(S,S) probabilities -> (height,width), bilinear on pixel centres."""
    return np.asarray(Image.fromarray(probability.astype(np.float32), mode="F").resize((width, height), Image.Resampling.BILINEAR))


def segment(predictor: Predictor, images: list[Image.Image], names: list[str] | None = None,
            sizes: list[tuple[int, int]] | None = None) -> list[Segmentation]:
    """Resize each image to the model's size, predict as one batch, bring probabilities back to each image's
    own size: its (width, height) in `sizes` when it was decoded reduced (`images.decode_reduced`)."""
    batch = np.stack([model_input(im, predictor.image_size) for im in images])
    probabilities = predictor(batch)
    results = []
    for n, (image, p) in enumerate(zip(images, probabilities)):
        full = to_own_size(p[0], *(sizes[n] if sizes else image.size))
        results.append(Segmentation(full >= predictor.threshold, full, names[n] if names else ""))
    return results


def as_image(item: ImageInput, index: int) -> tuple[Image.Image, str]:
    """An RGB PIL image and a name from a path (read under the shared image policy), a PIL image or an array."""
    if isinstance(item, (str, os.PathLike)):
        return decode_image(Path(item), str(item))[0], str(item)
    if isinstance(item, Image.Image):
        return item.convert("RGB"), getattr(item, "filename", "") or f"image {index}"
    if isinstance(item, np.ndarray):
        if item.ndim != 3 or item.shape[2] != 3 or item.dtype != np.uint8:
            raise DataError(f"image {index}: an array must be HxWx3 uint8 RGB, got shape {item.shape} {item.dtype}")
        return Image.fromarray(item), f"image {index}"
    raise DataError(f"image {index}: expected a path, a PIL image or an HxWx3 uint8 array, got {type(item).__name__}")


class Segmenter:
    """A model loaded once, segmenting any number of images. Get one with `lesionseg.load()`."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor

    @property
    def name(self) -> str:
        return self.predictor.name

    @property
    def version(self) -> str:
        return self.predictor.version

    def segment(self, images: ImageInput | list[ImageInput], batch_size: int = 16) -> Segmentation | list[Segmentation]:
        """One result for one input, a list for a list. Each has `.mask` (H,W bool, the image's own size),
        `.probability` (H,W float32) and `.stats` (area, bounding box, mean probability)."""
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        results = []
        for start in range(0, len(items), batch_size):
            opened = [as_image(item, start + n) for n, item in enumerate(items[start : start + batch_size])]
            results += segment(self.predictor, [im for im, _ in opened], [name for _, name in opened])
        return results[0] if single else results


def load(model: str | os.PathLike | None = None, tta: bool = False) -> Segmenter:
    """The released model (no argument), an exported `.onnx` file, or a checkpoint / run folder; with `tta`,
    each answer is the mean over flips (3 model calls per image)."""
    if model is not None and Path(model).suffix.lower() == ".onnx":
        return Segmenter(with_views(OnnxPredictor(model), flips=tta))
    return Segmenter(with_views(load_predictor(checkpoint=model), flips=tta))


def describe(name: str, result: Segmentation) -> dict[str, Any]:
    """The numbers a user asks of one image: lesion area, bounding box, mean lesion probability."""
    mask = result.mask
    height, width = mask.shape
    area = int(mask.sum())
    row: dict[str, Any] = {"file": name, "width": width, "height": height, "lesion_pixels": area,
                           "lesion_fraction": area / (width * height)}
    if area:  # the box from the rows and columns that hold lesion: no coordinate list of every pixel
        rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        row.update(bbox_x0=int(columns[0]), bbox_y0=int(rows[0]), bbox_x1=int(columns[-1]), bbox_y1=int(rows[-1]),
                   mean_probability=float(result.probability.sum(where=mask, dtype=np.float64) / area))
    else:
        row.update(bbox_x0=None, bbox_y0=None, bbox_x1=None, bbox_y1=None, mean_probability=None)
    return row


def outline(mask: np.ndarray, thickness: int) -> np.ndarray:
    """Pixels of the mask within `thickness` of its border (mask minus its erosion; the image edge is no border)."""
    return mask & ~ndimage.binary_erosion(mask, np.ones((3, 3), bool), iterations=thickness, border_value=1)


def overlay(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """The image with the lesion outline drawn on it."""
    pixels = np.array(image.convert("RGB"))
    pixels[outline(mask, max(1, min(mask.shape) // 150))] = OUTLINE_RGB
    return Image.fromarray(pixels)


def mask_image(mask: np.ndarray) -> Image.Image:
    return Image.fromarray(mask.astype(np.uint8) * 255)


def mask_png(mask: np.ndarray) -> bytes:
    """The mask as a 1-bit PNG (black 0, white 255 once decoded): 3-4x faster to write than 8-bit, and smaller."""
    return png_bytes(Image.fromarray(mask))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def collect_inputs(inputs: list[str | os.PathLike]) -> tuple[list[Path], list[str]]:
    """Image files named or found (recursively) in named folders; inputs that do not exist are problems."""
    files, problems = [], []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            files.append(item)
        else:
            problems.append(f"{item}: no such file or folder")
    return files, problems


def unique_stem(path: Path, used: set[str]) -> str:
    stem, n = path.stem, 1
    while stem in used:
        n += 1
        stem = f"{path.stem}-{n}"
    used.add(stem)
    return stem


@dataclass
class PredictReport:
    rows: list[dict[str, Any]]
    problems: list[str]


def run_predict(segmenter: Segmenter, inputs: list[str | os.PathLike], out: str | os.PathLike,
                batch_size: int = 16, progress: bool = True) -> PredictReport:
    """For each readable image: <stem>_mask.png, <stem>_overlay.png and a row in predictions.csv/json.
    An image that cannot be used is named on stderr and skipped; the others are still segmented."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files, problems = collect_inputs(inputs)
    for line in problems:
        print(f"lesionseg: skipped {line}", file=sys.stderr)
    rows, used = [], set()
    for start in tqdm(range(0, len(files), batch_size), desc="predict", unit="batch", disable=not progress):
        readable = []
        for path in files[start : start + batch_size]:
            try:
                readable.append((path, decode_image(path, str(path))[0]))
            except DataError as exc:
                problems.append(str(exc))
                print(f"lesionseg: skipped {exc}", file=sys.stderr)
        if not readable:
            continue
        for (path, image), result in zip(readable, segment(segmenter.predictor, [im for _, im in readable],
                                                            [str(p) for p, _ in readable])):
            stem = unique_stem(path, used)
            mask_image(result.mask).save(out / f"{stem}_mask.png")
            overlay(image, result.mask).save(out / f"{stem}_overlay.png")
            rows.append({**result.stats, "mask": f"{stem}_mask.png", "overlay": f"{stem}_overlay.png"})
    write_rows(rows, out)
    return PredictReport(rows, problems)


def write_rows(rows: list[dict[str, Any]], out: Path) -> None:
    (out / "predictions.json").write_text(json.dumps(rows, indent=1))
    if rows:
        with open(out / "predictions.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
