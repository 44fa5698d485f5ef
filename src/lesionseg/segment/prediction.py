"""`lesionseg predict`: for each image a mask PNG in OUT/masks/<stem>.png (the image's own size, 0/255, the
input's file stem: what the ISIC scorer and most pipelines read), an outline overlay and a probability map on
request, and a CSV/JSON row, through the one pipeline (`lesionseg.segment.pipeline`).

predict writes only into its own layout (`lesionseg.segment.outputs`) and keeps a record of what it wrote: a file it
would write that exists and is not in that record is someone else's, and the run is refused before anything
is written. A rerun skips what is done; `--shard K/N` (or torchrun's RANK/WORLD_SIZE) takes a share. Decoding,
the model and writing overlap; memory is bounded by the queues at the model's size plus at most MAX_PIXELS at
full size.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from lesionseg import dicom
from lesionseg.errors import DataError, LesionsegError
from lesionseg.files import held_by_another, locked, output_folder, shown, write_atomically
from lesionseg.images import MAX_PIXELS, PixelBudget, decode_image
from lesionseg.segment.descriptors import PixelSizes, describe, picture_of
from lesionseg.segment.dicomseg import write_segmentation
from lesionseg.segment.encoders import mask_png_8bit, overlay, probability_image
from lesionseg.segment.inputs import Inputs, collect_inputs, output_stems
from lesionseg.segment.outputs import (
    FOLDER_LOCK,
    JOURNALS,
    MASKS,
    Extras,
    Journal,
    Shard,
    Written,
    forget_other_models,
    input_identity,
    merge,
    refuse_foreign,
    refuse_other_model,
    refuse_replacing,
    remove_debris,
    shard_count_of,
)
from lesionseg.segment.pipeline import Pipeline, model_input, read_for_model

WORKERS = 2  # decoding and writing threads, beside the model's own
FULL_SIZE = PixelBudget(MAX_PIXELS)
JPEG_MAX_SIDE = 65_500  # libjpeg's limit: a larger overlay is skipped (named), the run goes on
KEEP_FOR_OVERLAY = 4_000_000  # pixels: an image this small is kept for its overlay, a larger one decoded again


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
    identity: dict[str, Any]  # the input's path, size and modification time, as read before decoding
    picture: np.ndarray  # (h,w,3) uint8, at most PICTURE_PIXELS: what colours and borders are read from
    archive: dict[str, Any] = field(default_factory=dict)  # a DICOM file's UIDs: a row joins back to the archive


def decode_one(path: Path, stem: str, size: int, keep: bool, identity: dict[str, Any]) -> Decoded | str:
    """One image at the model's size (in a worker thread: Pillow decodes without the GIL), or why it cannot be."""
    try:
        image, own_size, _ = read_for_model(path, shown(path), size)
    except DataError as exc:
        return str(exc)
    small = keep and image.size == own_size and own_size[0] * own_size[1] <= KEEP_FOR_OVERLAY
    pixels, picture = model_input(image, size), picture_of(image)
    archive = {k: v for k, v in image.info.get(dicom.INFO_KEY, {}).items() if k != "pixel_mm"}
    return Decoded(path, stem, pixels, own_size, image if small else None, identity, picture, archive)


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
        if key == "dicom_seg":
            row |= dicom_seg_of(item, mask, row, out / name, name)
            continue
        kind = "JPEG" if name.endswith(".jpg") else "PNG"
        if kind == "JPEG" and max(item.size) > JPEG_MAX_SIDE:
            row[key], row[f"{key}_skipped"] = None, f"JPEG holds at most {JPEG_MAX_SIDE:,} px a side"
            print(f"lesionseg: skipped the overlay of {shown(item.path)}: {row[f'{key}_skipped']}", file=sys.stderr)
            continue
        image = outlined(item, mask) if key == "overlay" else grey
        write_atomically(out / name, lambda handle: image.save(handle, format=kind, quality=90), key.replace("_", " "))
        row[key] = name
    return row


def dicom_seg_of(item: Decoded, mask: np.ndarray, row: dict[str, Any], target: Path, name: str) -> dict[str, Any]:
    """The image's DICOM Segmentation where the image is DICOM; else the row says why there is none."""
    if not item.archive:
        return {"dicom_seg": None, "dicom_seg_skipped": "not a DICOM image"}
    try:
        write_segmentation(item.path, mask, row, target)
    except DataError as exc:
        print(f"lesionseg: skipped the DICOM Segmentation of {exc}", file=sys.stderr)
        return {"dicom_seg": None, "dicom_seg_skipped": str(exc)[:300]}
    return {"dicom_seg": name}


def outlined(item: Decoded, mask: np.ndarray) -> Image.Image:
    """The image with its mask's outline, decoded again at full size unless it was small enough to keep."""
    return overlay(item.kept or decode_image(item.path, shown(item.path))[0], mask)


def run_predict(
    pipeline: Pipeline,
    inputs: list[str | os.PathLike],
    out: str | os.PathLike,
    batch_size: int = 16,
    progress: bool = True,
    extras: Extras = Extras(),
    overwrite: bool = False,
    shard: Shard = Shard(),
    pixel_sizes: PixelSizes = PixelSizes(),
) -> PredictReport:
    """Segment every readable image of this shard into `out`; an image that cannot be used is named on stderr
    and skipped, the others are still segmented. Everything is checked before the first file is written;
    images an earlier run of the same model and options finished from the same unchanged file are not redone
    (unless `overwrite`). Decoding and writing run in worker threads beside the model, through bounded queues.
    The folder's rules: `lesionseg.segment.outputs`."""
    out = output_folder(out)
    found = collect_inputs(inputs, out)
    stems = output_stems(found.images)
    mine = [(path, stem) for path, stem in zip(found.images, stems) if shard.takes(stem)]
    planned = [name for _, stem in mine for name in output_names(stem, extras)]
    refuse_foreign(out, planned, Written.read(out))  # before a lock file is made in what may be someone's folder
    with locked(out / shard.lock, f"shard {shard.index + 1} of {shard.count}"):
        with locked(out / FOLDER_LOCK, "the folder", wait=True):
            plan = plan_run(pipeline, out, mine, extras, overwrite, shard, pixel_sizes)
        problems = report_skipped(found)
        rows = list(plan.kept)
        bar = tqdm(total=len(plan.todo), desc="predict", unit="image", disable=not progress)
        rows += segment_all(pipeline, plan, out, extras, batch_size, problems, bar)
        bar.close()
        plan.journal.finish()
    merge(out, shard.count)
    return PredictReport(rows, problems, len(plan.kept))


@dataclass
class Plan:
    """What this run will do, decided with the folder locked: images to segment (with their identity), rows kept."""

    todo: list[tuple[Path, str, dict[str, Any]]]
    kept: list[dict[str, Any]]
    journal: Journal
    model: dict[str, str]


def plan_run(
    pipeline: Pipeline, out: Path, mine: list, extras: Extras, overwrite: bool, shard: Shard, sizes: PixelSizes
) -> Plan:
    """Read what the folder holds, refuse what would lose or mix anything, and open this shard's journal. The pixel
    size an image is measured at is part of its identity: another size redoes its row, never keeps the old mm."""
    refuse_other_counts(out, shard)
    written = Written.read(out)
    header = {"model": pipeline.name, "version": pipeline.version, "sha256": pipeline.sha256}
    header["refinements"] = pipeline.refine.name
    if overwrite:
        forget_other_models(out, written, header, shard.lock)
    else:
        refuse_other_model(written, header)
        refuse_replacing(mine, written)
    planned = [name for _, stem in mine for name in output_names(stem, extras)]
    refuse_foreign(out, planned, written)
    remove_debris(out, shard)
    identities = [input_identity(path) | {"pixel_mm": pixel_mm_of(path, stem, sizes)} for path, stem in mine]
    sizes.tell_missing([(path.name, stem) for path, stem in mine])
    done = set()
    if not overwrite:
        done = {s for (_, s), i in zip(mine, identities) if written.complete(out, f"{MASKS}/{s}.png", i, extras, s)}
    for folder in extras.folders():
        output_folder(out / folder)
    kept = [written.rows[f"{MASKS}/{s}.png"] for _, s in mine if s in done]
    todo = [(path, stem, identity) for (path, stem), identity in zip(mine, identities) if stem not in done]
    model = {"model": pipeline.name, "model_version": pipeline.version, "model_sha256": pipeline.sha256}
    return Plan(todo, kept, Journal(out, shard, header, kept), model)


def pixel_mm_of(path: Path, stem: str, sizes: PixelSizes) -> float | None:
    """--pixel-size where it says one for this image, else the spacing a DICOM file states, else none."""
    given = sizes.of(stem, path.name)
    return given if given is not None else dicom.stated_pixel_mm(path)


def refuse_other_counts(out: Path, shard: Shard) -> None:
    """Shards of another count N may take the same names: they write into one folder only one after another."""
    for journal in out.glob(JOURNALS):
        lock = out / (journal.name.removesuffix(".jsonl") + ".lock")
        if shard_count_of(journal.name) != shard.count and held_by_another(lock):
            raise LesionsegError(
                f"{shown(out)}: {journal.name} is being written by a run split into {shard_count_of(journal.name)} "
                f"shards, and this one is split into {shard.count}; wait for it, or use the same count"
            )


def segment_all(pipeline: Pipeline, plan: Plan, out: Path, extras: Extras, batch_size: int, problems, bar) -> list:
    """The images through decoding (threads), the model (batches) and writing (threads), each row journaled."""
    rows, window = [], 2 * batch_size
    with ThreadPoolExecutor(WORKERS) as decoders, ThreadPoolExecutor(WORKERS) as writers:
        work = (
            (path, stem, pipeline.image_size, bool(extras.overlays), identity) for path, stem, identity in plan.todo
        )
        pending: deque = deque()
        for batch in batches(ahead(work, decode_one, decoders, window), batch_size, problems):
            probabilities = pipeline.probabilities(np.stack([item.pixels for item in batch]))
            plan.journal.intend([name for item in batch for name in output_names(item.stem, extras)])
            for item, probability in zip(batch, probabilities):
                pending.append(writers.submit(finish_one, pipeline, item, probability[0], out, extras, plan))
                while len(pending) > window or (pending and pending[0].done()):
                    rows.append(record(pending.popleft().result(), plan.journal, bar))
        while pending:
            rows.append(record(pending.popleft().result(), plan.journal, bar))
    return rows


def output_names(stem: str, extras: Extras) -> list[str]:
    return [f"{MASKS}/{stem}.png", *extras.names(stem).values()]


def record(row: dict[str, Any], journal: Journal, bar) -> dict[str, Any]:
    journal.add(row)
    bar.update()
    return row


def finish_one(
    pipeline: Pipeline, item: Decoded, probability: np.ndarray, out: Path, extras: Extras, plan: Plan
) -> dict[str, Any]:
    """Back to the image's own size, its row (with the model and the input's identity), and its files (in a
    worker thread; both workers together hold at most MAX_PIXELS at full size)."""
    with FULL_SIZE.hold(item.size[0] * item.size[1]):
        result = pipeline.result(probability, item.size, shown(item.path))
        lesion = describe(item.picture, result.mask, item.identity["pixel_mm"])
        row, mask = {**result.stats, **lesion, **item.identity, **item.archive, **plan.model}, result.mask
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
