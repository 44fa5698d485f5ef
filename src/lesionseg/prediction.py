"""`lesionseg predict`: for each image a mask PNG in OUT/masks/<stem>.png (the image's own size, 0/255, the
input's file stem: what the ISIC scorer and most pipelines read), an outline overlay on request, and a
CSV/JSON row, through the one pipeline (`lesionseg.pipeline`).

predict writes only into its own layout and keeps a record of what it wrote (predictions.json): a file it
would write that exists and is not in that record is someone else's, and the run is refused before anything
is written. Memory is bounded by the batch at the model's size plus one image at full size.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm.auto import tqdm

from lesionseg.errors import DataError, LesionsegError
from lesionseg.files import output_folder, shown, unusable, write_atomically
from lesionseg.images import IMAGE_SUFFIXES, decode_image
from lesionseg.pipeline import Pipeline, Segmentation, model_input, read_for_model

OUTLINE_RGB = (0, 255, 0)
MASKS, OVERLAYS = "masks", "overlays"
RECORD, TABLE = "predictions.json", "predictions.csv"
KEEP_FOR_OVERLAY = 4_000_000  # pixels: an image this small is kept for its overlay, a larger one decoded again


def outline(mask: np.ndarray, thickness: int) -> np.ndarray:
    """Pixels of the mask within `thickness` of its border (mask minus its erosion; the image edge is no border)."""
    return mask & ~ndimage.binary_erosion(mask, np.ones((3, 3), bool), iterations=thickness, border_value=1)


def overlay(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """The image with the lesion outline drawn on it."""
    pixels = np.array(image if image.mode == "RGB" else image.convert("RGB"))  # one copy, to draw on
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


@dataclass
class Inputs:
    """What a list of files and folders holds: images to segment, and every other entry named with its reason."""

    images: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    unsupported: list[Path] = field(default_factory=list)


def walk_folder(folder: Path, skip: set[Path], found: Inputs) -> int:
    """Images under `folder` (recursively, symbolic links to folders not followed; the output folders `skip`
    left out, so a second run never segments the first one's masks); returns how many."""
    count = 0
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if Path(root, d).resolve() not in skip)
        for name in sorted(names):
            path = Path(root, name)
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                found.unsupported.append(path)
            elif reason := unusable(path):
                found.problems.append(f"{shown(path)}: {reason}")
            else:
                found.images.append(path)
                count += 1
    return count


def collect_inputs(inputs: list[str | os.PathLike], out: Path) -> Inputs:
    """Image files named, or found in named folders; everything that is not segmented is named with its reason."""
    found, skip = Inputs(), {out.resolve(), (out / MASKS).resolve(), (out / OVERLAYS).resolve()}
    for item in map(Path, inputs):
        if item.is_dir():
            if not walk_folder(item, skip, found):
                found.problems.append(f"{shown(item)}: no image ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        elif reason := unusable(item):
            found.problems.append(f"{shown(item)}: {reason}")
        else:
            found.images.append(item)
    return found


def output_stems(images: list[Path]) -> list[str]:
    """Each image's stem, the id its mask is written under; two images with one id are refused, both named."""
    first: dict[str, Path] = {}
    for path in images:
        stem = shown(path.stem)
        if stem in first:
            raise DataError(
                f"{shown(first[stem])} and {shown(path)} would both be written as {MASKS}/{stem}.png; "
                "nothing was written: rename one, or segment them into separate --out folders"
            )
        first[stem] = path
    return list(first)


def read_record(out: Path) -> list[dict[str, Any]]:
    """The rows an earlier predict wrote into `out` (none if it has no record); a record predict cannot have
    written means the folder is someone else's."""
    path = out / RECORD
    if not path.exists():
        if (out / TABLE).exists():
            raise LesionsegError(f"{shown(out / TABLE)} exists without {RECORD}: not written by lesionseg predict")
        return []
    try:
        rows = json.loads(path.read_text())
        assert isinstance(rows, list) and all(isinstance(r, dict) and "mask" in r for r in rows)
    except (OSError, ValueError, AssertionError):
        raise LesionsegError(
            f"{shown(path)}: not a record written by lesionseg predict; choose another --out"
        ) from None
    return rows


def check_nothing_foreign(out: Path, planned: list[str], record: list[dict[str, Any]]) -> None:
    """Refuse, before anything is written, to replace a file that no earlier predict into `out` wrote."""
    ours = {row[key] for row in record for key in ("mask", "overlay") if row.get(key)}
    for name in planned:
        if name not in ours and (out / name).exists():
            raise LesionsegError(
                f"{shown(out / name)}: exists and was not written by lesionseg predict; "
                "nothing was written: choose another --out"
            )


@dataclass
class PredictReport:
    rows: list[dict[str, Any]]
    problems: list[str]


@dataclass
class Decoded:
    path: Path
    stem: str
    pixels: np.ndarray  # uint8 (3,S,S): the model's input
    size: tuple[int, int]  # the image's own (width, height)
    kept: Image.Image | None  # the decoded image, when small enough to keep for its overlay


def decoded_batches(
    images: list[Path], stems: list[str], size: int, batch_size: int, problems: list[str]
) -> Iterator[list[Decoded]]:
    """Batches of images at the model's size: a batch never holds a full-size image it does not need."""
    batch = []
    for path, stem in zip(images, stems):
        try:
            image, own_size, _ = read_for_model(path, shown(path), size)
        except DataError as exc:
            problems.append(str(exc))
            print(f"lesionseg: skipped {exc}", file=sys.stderr)
            continue
        small = image.size == own_size and own_size[0] * own_size[1] <= KEEP_FOR_OVERLAY
        batch.append(Decoded(path, stem, model_input(image, size), own_size, image if small else None))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def write_outputs(item: Decoded, mask: np.ndarray, row: dict[str, Any], out: Path, overlays: bool) -> dict[str, Any]:
    """One image's mask (and overlay), each written atomically: a killed run leaves no half-written file."""
    mask_name = f"{MASKS}/{item.stem}.png"
    write_atomically(out / mask_name, lambda handle: mask_image(mask).save(handle, format="PNG"), "mask")
    row = {**row, "mask": mask_name}
    if overlays:
        full = item.kept or decode_image(item.path, shown(item.path))[0]
        drawn = overlay(full, mask)
        del full
        name = f"{OVERLAYS}/{item.stem}.png"
        write_atomically(out / name, lambda handle: drawn.save(handle, format="PNG"), "overlay")
        row["overlay"] = name
    return row


def run_predict(
    pipeline: Pipeline,
    inputs: list[str | os.PathLike],
    out: str | os.PathLike,
    batch_size: int = 16,
    progress: bool = True,
    overlays: bool = False,
) -> PredictReport:
    """Segment every readable image into `out`; an image that cannot be used is named on stderr and skipped,
    the others are still segmented. Everything is checked before the first file is written."""
    out = output_folder(out)
    found = collect_inputs(inputs, out)
    stems = output_stems(found.images)
    record = read_record(out)
    planned = [f"{MASKS}/{s}.png" for s in stems] + ([f"{OVERLAYS}/{s}.png" for s in stems] if overlays else [])
    check_nothing_foreign(out, planned, record)
    problems = list(found.problems)
    if found.unsupported:
        names = ", ".join(shown(p.name) for p in found.unsupported[:5])
        more = f" and {len(found.unsupported) - 5} more" if len(found.unsupported) > 5 else ""
        problems.append(f"{len(found.unsupported)} file(s) in no supported format: {names}{more}")
    for line in problems:
        print(f"lesionseg: skipped {line}", file=sys.stderr)
    for folder in (MASKS, OVERLAYS) if overlays else (MASKS,):
        output_folder(out / folder)
    rows = []
    bar = tqdm(total=len(found.images), desc="predict", unit="image", disable=not progress)
    for batch in decoded_batches(found.images, stems, pipeline.image_size, batch_size, problems):
        probabilities = pipeline.probabilities(np.stack([item.pixels for item in batch]))
        for item, probability in zip(batch, probabilities):
            mask, full = pipeline.mask(probability[0], item.size)
            row = Segmentation(mask, full, shown(item.path)).stats
            del full  # the full-size probabilities are not needed for the files: one large array fewer at a time
            rows.append(write_outputs(item, mask, row, out, overlays))
            bar.update()
    bar.close()
    write_record(rows, record, out)
    return PredictReport(rows, problems)


def write_record(rows: list[dict[str, Any]], earlier: list[dict[str, Any]], out: Path) -> None:
    """predictions.json and .csv: this run's rows, and an earlier run's rows for masks this run did not redo."""
    redone = {row["mask"] for row in rows}
    rows = [row for row in earlier if row["mask"] not in redone] + rows
    write_atomically(out / RECORD, lambda handle: handle.write(json.dumps(rows, indent=1).encode()), RECORD)
    fields = list(dict.fromkeys(key for row in rows for key in row))

    def table(handle) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        handle.write(text.getvalue().encode())

    write_atomically(out / TABLE, table, TABLE)
