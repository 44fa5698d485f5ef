"""Segment new images: predictors (PyTorch checkpoint or ONNX), full-resolution masks, overlays, rows.

A predictor maps uint8 images (B,3,S,S) at the model's size to lesion probabilities (B,1,S,S);
everything else (reading, resizing back to each image's own size, outlines, numbers) is shared.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from tqdm.auto import tqdm

from lesionseg.data import IMAGE_SUFFIXES, normalize, read_image, resize_image
from lesionseg.errors import DataError, LesionsegError

OUTLINE_RGB = (0, 255, 0)


class Predictor(Protocol):
    image_size: int
    threshold: float
    name: str  # what the page and the API show: which model answered
    version: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


class TorchPredictor:
    """A trained checkpoint, rebuilt from its stored config."""

    def __init__(self, checkpoint: str | os.PathLike, channels_last: bool = False) -> None:
        from lesionseg.training import load_checkpoint, model_from_checkpoint

        state = load_checkpoint(checkpoint)
        self.model, config = model_from_checkpoint(state)
        self.image_size, self.threshold = config.image_size, config.threshold
        self.name = f"{config.name} ({config.arch}, {config.image_size} px)"
        self.version = f"{Path(checkpoint).name}, epoch {state['epoch']}, lesionseg {state.get('info', {}).get('lesionseg', '?')}"
        self.channels_last = channels_last
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = normalize(images)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return torch.sigmoid(self.model(x))


class OnnxPredictor:
    """An exported model run by onnxruntime; size and threshold come from the file's metadata."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        import onnxruntime as ort

        from lesionseg.export import read_metadata

        path = Path(path)
        meta = read_metadata(path)
        self.image_size, self.threshold = int(meta["image_size"]), float(meta["threshold"])
        self.name = meta.get("name", f"{meta.get('arch', 'model')} ({self.image_size} px)")
        self.version = meta.get("version", path.name)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.as_subclass(torch.Tensor).float().div(255).numpy()
        return torch.from_numpy(self.session.run(None, {"image": x})[0])


def load_predictor(checkpoint: str | None = None, onnx: str | None = None) -> Predictor:
    if bool(checkpoint) == bool(onnx):
        raise LesionsegError("give either --checkpoint CKPT or --onnx MODEL")
    return OnnxPredictor(onnx) if onnx else TorchPredictor(checkpoint)


@dataclass
class Segmentation:
    """One image's result at its own resolution: boolean mask and probabilities, both (H,W)."""

    mask: np.ndarray
    probability: np.ndarray


def segment(predictor: Predictor, images: list[Image.Image]) -> list[Segmentation]:
    """Resize each image to the model's size, predict as one batch, bring probabilities back to size."""
    batch = torch.stack([resize_image(im, predictor.image_size) for im in images])
    probabilities = predictor(batch)
    results = []
    for image, p in zip(images, probabilities):
        full = F.interpolate(p[None].float(), size=(image.height, image.width), mode="bilinear", align_corners=False)[0, 0]
        full = full.numpy()
        results.append(Segmentation(full >= predictor.threshold, full))
    return results


def describe(name: str, result: Segmentation) -> dict[str, Any]:
    """The numbers a user asks of one image: lesion area, bounding box, mean lesion probability."""
    mask = result.mask
    height, width = mask.shape
    area = int(mask.sum())
    row: dict[str, Any] = {"file": name, "width": width, "height": height, "lesion_pixels": area,
                           "lesion_fraction": area / (width * height)}
    if area:
        ys, xs = np.nonzero(mask)
        row.update(bbox_x0=int(xs.min()), bbox_y0=int(ys.min()), bbox_x1=int(xs.max()), bbox_y1=int(ys.max()),
                   mean_probability=float(result.probability[mask].mean()))
    else:
        row.update(bbox_x0=None, bbox_y0=None, bbox_x1=None, bbox_y1=None, mean_probability=None)
    return row


def outline(mask: np.ndarray, thickness: int) -> np.ndarray:
    """Pixels of the mask within `thickness` of its border (mask minus its erosion)."""
    m = torch.from_numpy(mask).float()[None, None]
    eroded = -F.max_pool2d(-m, 2 * thickness + 1, stride=1, padding=thickness)
    return (m - eroded)[0, 0].numpy() > 0


def overlay(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """The image with the lesion outline drawn on it."""
    pixels = np.array(image.convert("RGB"))
    pixels[outline(mask, max(1, min(mask.shape) // 150))] = OUTLINE_RGB
    return Image.fromarray(pixels)


def mask_image(mask: np.ndarray) -> Image.Image:
    return Image.fromarray(mask.astype(np.uint8) * 255)


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


def run_predict(predictor: Predictor, inputs: list[str | os.PathLike], out: str | os.PathLike,
                batch_size: int = 16, progress: bool = True) -> PredictReport:
    """For each readable image: <stem>_mask.png, <stem>_overlay.png and a row in predictions.csv/json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files, problems = collect_inputs(inputs)
    rows, used = [], set()
    for start in tqdm(range(0, len(files), batch_size), desc="predict", unit="batch", disable=not progress):
        readable = []
        for path in files[start : start + batch_size]:
            try:
                readable.append((path, read_image(path)))
            except DataError as exc:
                problems.append(str(exc))
                print(f"lesionseg: skipped {exc}", file=sys.stderr)
        if not readable:
            continue
        for (path, image), result in zip(readable, segment(predictor, [im for _, im in readable])):
            stem = unique_stem(path, used)
            mask_image(result.mask).save(out / f"{stem}_mask.png")
            overlay(image, result.mask).save(out / f"{stem}_overlay.png")
            rows.append({**describe(str(path), result), "mask": f"{stem}_mask.png", "overlay": f"{stem}_overlay.png"})
    write_rows(rows, out)
    return PredictReport(rows, problems)


def write_rows(rows: list[dict[str, Any]], out: Path) -> None:
    (out / "predictions.json").write_text(json.dumps(rows, indent=1))
    if rows:
        with open(out / "predictions.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
