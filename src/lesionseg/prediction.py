"""`lesionseg predict`: a mask PNG, an outline overlay and a CSV/JSON row for each image, through the one
pipeline (`lesionseg.pipeline`)."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm.auto import tqdm

from lesionseg.errors import DataError
from lesionseg.images import IMAGE_SUFFIXES, decode_image
from lesionseg.pipeline import Pipeline, read_for_model

OUTLINE_RGB = (0, 255, 0)


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


def run_predict(
    pipeline: Pipeline,
    inputs: list[str | os.PathLike],
    out: str | os.PathLike,
    batch_size: int = 16,
    progress: bool = True,
) -> PredictReport:
    """For each readable image: <stem>_mask.png, <stem>_overlay.png and a row in predictions.csv/json.
    An image that cannot be used is named on stderr and skipped; the others are still segmented. Each batch
    holds images decoded only as large as the model needs."""
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
                readable.append((path, *read_for_model(path, str(path), pipeline.image_size)[:2]))
            except DataError as exc:
                problems.append(str(exc))
                print(f"lesionseg: skipped {exc}", file=sys.stderr)
        if not readable:
            continue
        results = pipeline.segment(
            [im for _, im, _ in readable], [str(p) for p, _, _ in readable], [size for _, _, size in readable]
        )
        for (path, image, size), result in zip(readable, results):
            stem = unique_stem(path, used)
            mask_image(result.mask).save(out / f"{stem}_mask.png")
            full = image if image.size == size else decode_image(path, str(path))[0]  # decoded again only if reduced
            overlay(full, result.mask).save(out / f"{stem}_overlay.png")
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
