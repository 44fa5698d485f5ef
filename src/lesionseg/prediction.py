"""`lesionseg predict`: for each image a mask PNG in OUT/masks/<stem>.png (the image's own size, 0/255, the
input's file stem: what the ISIC scorer and most pipelines read), an outline overlay and a probability map on
request, and a CSV/JSON row, through the one pipeline (`lesionseg.pipeline`).

predict writes only into its own layout (`lesionseg.outputs`) and keeps a record of what it wrote: a file it
would write that exists and is not in that record is someone else's, and the run is refused before anything
is written. A rerun skips what is done; `--shard K/N` (or torchrun's RANK/WORLD_SIZE) takes a share. Decoding,
the model and writing overlap; memory is bounded by the queues at the model's size plus at most MAX_PIXELS at
full size.
"""

from __future__ import annotations

import io
import os
import struct
import sys
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm.auto import tqdm

from lesionseg.errors import DataError
from lesionseg.files import output_folder, same_stem, shown, unusable, write_atomically
from lesionseg.images import IMAGE_SUFFIXES, MAX_PIXELS, PixelBudget, decode_image
from lesionseg.outputs import (
    MASKS,
    OVERLAYS,
    PROBABILITIES,
    Extras,
    Journal,
    Shard,
    Written,
    forget_other_models,
    merge,
    refuse_foreign,
    refuse_other_model,
)
from lesionseg.pipeline import Pipeline, Segmentation, model_input, read_for_model

OUTLINE_RGB = (0, 255, 0)
WORKERS = 2  # decoding and writing threads, beside the model's own
FULL_SIZE = PixelBudget(MAX_PIXELS)
KEEP_FOR_OVERLAY = 4_000_000  # pixels: an image this small is kept for its overlay, a larger one decoded again


def outline(mask: np.ndarray, thickness: int) -> np.ndarray:
    """Pixels of the mask within `thickness` of its border (mask minus its erosion; the image edge is no border)."""
    return mask & ~ndimage.binary_erosion(mask, np.ones((3, 3), bool), iterations=thickness, border_value=1)


def overlay(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """The image with the lesion outline drawn on it."""
    pixels = np.array(image if image.mode == "RGB" else image.convert("RGB"))  # one copy, to draw on
    pixels[outline(mask, max(1, min(mask.shape) // 150))] = OUTLINE_RGB
    return Image.fromarray(pixels)


def mask_png_8bit(mask: np.ndarray) -> bytes:
    """The mask as an 8-bit grayscale PNG, 0/255, what the ISIC scorer reads. Written here rather than by Pillow,
    whose PNG encoder tries four row filters on every row: for a two-valued image no filter and zlib level 1 give
    the same size (benchmarks/README.md, "predict end to end") in a third of the time, and zlib releases the GIL."""
    height, width = mask.shape
    rows = np.zeros((height, width + 1), np.uint8)  # each row: filter type 0 (none), then its pixels
    np.multiply(mask, 255, out=rows[:, 1:], casting="unsafe")
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8 bits, grayscale, deflate, no interlace
    return PNG_SIGNATURE + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(rows, 1)) + png_chunk(b"IEND")


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunk(kind: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


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
    found, skip = Inputs(), {(out / folder).resolve() for folder in ("", MASKS, OVERLAYS, PROBABILITIES)}
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
    if pair := same_stem(images):
        raise DataError(
            f"{shown(pair[0])} and {shown(pair[1])} would both be written as {MASKS}/{shown(pair[1].stem)}.png; "
            "nothing was written: rename one, or segment them into separate --out folders"
        )
    return [shown(path.stem) for path in images]


@dataclass
class PredictReport:
    rows: list[dict[str, Any]]  # this process's images, the ones already done included
    problems: list[str]
    resumed: int = 0  # images whose outputs an earlier run had written


@dataclass
class Decoded:
    path: Path
    stem: str
    pixels: np.ndarray  # uint8 (3,S,S): the model's input
    size: tuple[int, int]  # the image's own (width, height)
    kept: Image.Image | None  # the decoded image, when small enough to keep for its overlay


def decode_one(path: Path, stem: str, size: int, keep: bool) -> Decoded | str:
    """One image at the model's size (in a worker thread: Pillow decodes without the GIL), or why it cannot be."""
    try:
        image, own_size, _ = read_for_model(path, shown(path), size)
    except DataError as exc:
        return str(exc)
    small = keep and image.size == own_size and own_size[0] * own_size[1] <= KEEP_FOR_OVERLAY
    return Decoded(path, stem, model_input(image, size), own_size, image if small else None)


def ahead(items: Iterable, work: Callable, pool: ThreadPoolExecutor, window: int) -> Iterator:
    """`work(*item)` for each item, in order, at most `window` running or waiting: a bounded queue, so a
    100,000-image folder is never held in memory."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(work, *item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def batches(decoded: Iterator, batch_size: int, problems: list[str]) -> Iterator[list[Decoded]]:
    batch = []
    for item in decoded:
        if isinstance(item, str):
            problems.append(item)
            print(f"lesionseg: skipped {item}", file=sys.stderr)
            continue
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def write_outputs(
    item: Decoded, mask: np.ndarray, grey: Image.Image | None, row: dict[str, Any], out: Path, extras: Extras
) -> dict[str, Any]:
    """One image's mask, and the overlay and probability map (`grey`) if asked, each written atomically: a killed
    run leaves no half-written file."""
    mask_name = f"{MASKS}/{item.stem}.png"
    encoded = mask_png_8bit(mask)
    write_atomically(out / mask_name, lambda handle: handle.write(encoded), "mask")
    row = {**row, "mask": mask_name}
    for key, name in extras.names(item.stem).items():
        image = outlined(item, mask) if key == "overlay" else grey
        kind = "JPEG" if name.endswith(".jpg") else "PNG"
        write_atomically(out / name, lambda handle: image.save(handle, format=kind, quality=90), key.replace("_", " "))
        row[key] = name
    return row


def outlined(item: Decoded, mask: np.ndarray) -> Image.Image:
    """The image with its mask's outline, decoded again at full size unless it was small enough to keep."""
    return overlay(item.kept or decode_image(item.path, shown(item.path))[0], mask)


def probability_image(result: Segmentation) -> Image.Image:
    """The lesion probability at the image's own size as 8-bit grey: 0..255 for 0..1."""
    return Image.fromarray((result.probability * 255 + 0.5).astype(np.uint8))


def run_predict(
    pipeline: Pipeline,
    inputs: list[str | os.PathLike],
    out: str | os.PathLike,
    batch_size: int = 16,
    progress: bool = True,
    extras: Extras = Extras(),
    overwrite: bool = False,
    shard: Shard = Shard(),
) -> PredictReport:
    """Segment every readable image of this shard into `out`; an image that cannot be used is named on stderr
    and skipped, the others are still segmented. Everything is checked before the first file is written;
    images an earlier run of the same model and options finished are not redone (unless `overwrite`).
    Decoding and writing run in worker threads beside the model, through bounded queues."""
    out = output_folder(out)
    found = collect_inputs(inputs, out)
    stems = output_stems(found.images)
    written = Written.read(out)
    header = {"model": pipeline.name, "version": pipeline.version, "refinements": pipeline.refine.name}
    if overwrite:
        forget_other_models(out, written, header)
    else:
        refuse_other_model(written, header)
    mine = [(path, stem) for path, stem in zip(found.images, stems) if shard.takes(stem)]
    planned = [name for _, stem in mine for name in output_names(stem, extras)]
    refuse_foreign(out, planned, written)
    done = (
        [] if overwrite else [(p, s) for p, s in mine if written.complete(out, f"{MASKS}/{s}.png", shown(p), extras, s)]
    )
    finished = set(done)
    todo = [item for item in mine if item not in finished]
    problems = report_skipped(found)
    for folder in extras.folders():
        output_folder(out / folder)
    kept = [written.rows[f"{MASKS}/{s}.png"] for _, s in done]
    journal = Journal(out, shard, header, kept)
    rows = list(kept)
    bar = tqdm(total=len(todo), desc="predict", unit="image", disable=not progress)
    window = 2 * batch_size
    with ThreadPoolExecutor(WORKERS) as decoders, ThreadPoolExecutor(WORKERS) as writers:
        work = ((path, stem, pipeline.image_size, bool(extras.overlays)) for path, stem in todo)
        pending: deque = deque()
        for batch in batches(ahead(work, decode_one, decoders, window), batch_size, problems):
            probabilities = pipeline.probabilities(np.stack([item.pixels for item in batch]))
            journal.intend([name for item in batch for name in output_names(item.stem, extras)])
            for item, probability in zip(batch, probabilities):
                pending.append(writers.submit(finish_one, pipeline, item, probability[0], out, extras))
                while len(pending) > window or (pending and pending[0].done()):
                    rows.append(record(pending.popleft().result(), journal, bar))
        while pending:
            rows.append(record(pending.popleft().result(), journal, bar))
    bar.close()
    journal.finish()
    merge(out, shard.count)
    return PredictReport(rows, problems, len(done))


def output_names(stem: str, extras: Extras) -> list[str]:
    return [f"{MASKS}/{stem}.png", *extras.names(stem).values()]


def record(row: dict[str, Any], journal: Journal, bar) -> dict[str, Any]:
    journal.add(row)
    bar.update()
    return row


def finish_one(pipeline: Pipeline, item: Decoded, probability: np.ndarray, out: Path, extras: Extras) -> dict[str, Any]:
    """Back to the image's own size, its row, and its files (in a worker thread; both workers together hold at
    most MAX_PIXELS at full size)."""
    with FULL_SIZE.hold(item.size[0] * item.size[1]):
        result = pipeline.result(probability, item.size, shown(item.path))
        row, mask = result.stats, result.mask
        grey = probability_image(result) if extras.probabilities else None
        del result  # the full-size probabilities are not needed for the files: one large array fewer at a time
        return write_outputs(item, mask, grey, row, out, extras)


def report_skipped(found: Inputs) -> list[str]:
    """Every input that is not segmented, named on stderr."""
    problems = list(found.problems)
    if found.unsupported:
        names = ", ".join(shown(p.name) for p in found.unsupported[:5])
        more = f" and {len(found.unsupported) - 5} more" if len(found.unsupported) > 5 else ""
        problems.append(f"{len(found.unsupported)} file(s) in no supported format: {names}{more}")
    for line in problems:
        print(f"lesionseg: skipped {line}", file=sys.stderr)
    return problems
