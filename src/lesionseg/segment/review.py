"""`lesionseg review OUT`: a local page over a predict folder that shows the least trusted masks first and keeps
the user's accepts and corrections, as a data folder `adapt` and `train` read as it is:

    OUT/review/images/<name>      a link to (or, where links cannot be made, a copy of) each reviewed image
    OUT/review/masks/<stem>.png   the accepted or corrected mask, 0/255 at the image's own size
    OUT/review/review.jsonl       one line per save: which mask, accepted or corrected, when, from which model

The model's own masks in OUT/masks are never written. Every request names an image by its place in the list,
never by a path, so the page can reach only the images of that folder.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lesionseg.errors import DataError, LesionsegError
from lesionseg.files import locked, output_folder, shown, write_atomically
from lesionseg.images import decode_image, inspect_mask, open_checked, read_mask
from lesionseg.segment.descriptors import measure
from lesionseg.segment.encoders import mask_png_8bit
from lesionseg.segment.outputs import MASKS, PROBABILITIES, RECORD, read_table
from lesionseg.segment.pipeline import Refinements, refined_mask

REVIEW = "review"
JOURNAL = "review.jsonl"
LOCK = ".review.lock"
PAGE_SIZE = 50  # list items per request: a 10,000-image folder is never sent at once
MAX_MASK_BYTES = 16 * 2**20  # a 0/255 PNG of the largest image (60 MP) compresses far below this
ACTIONS = ("accepted", "corrected")
IDENTITY = ("file", "file_bytes", "file_mtime_ns")  # predict's record of the input a row was made from
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Item:
    """One image of the folder, in review order."""

    index: int
    stem: str
    row: dict[str, Any]

    @property
    def quality(self) -> float | None:
        value = self.row.get("quality")
        return float(value) if isinstance(value, (int, float)) else None

    @property
    def flagged(self) -> bool:
        return bool(self.row.get("review"))


def read_journal(folder: Path) -> dict[str, dict[str, Any]]:
    """The last save of each mask in a review folder (`adapt` reads it too: which masks were corrected); a line
    cut short by a kill is ignored."""
    saved: dict[str, dict[str, Any]] = {}
    path = Path(folder) / JOURNAL
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("action") in ACTIONS and isinstance(entry.get("stem"), str):
            saved[entry["stem"]] = entry
    return saved


def review_order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flagged first, then by estimated quality, lowest first; masks without an estimate last; ties by name."""
    return sorted(
        rows,
        key=lambda r: (
            not r.get("review"),
            r["quality"] if isinstance(r.get("quality"), (int, float)) else 2.0,
            r["mask"],
        ),
    )


class ReviewFolder:
    """A predict folder seen by the review page: its rows in review order and what has been saved so far."""

    def __init__(self, out: str | os.PathLike, images: str | os.PathLike | None = None) -> None:
        self.out = Path(out)
        if not (self.out / RECORD).is_file():
            raise LesionsegError(
                f"{shown(self.out)}: no {RECORD}: not a folder lesionseg predict finished (run predict, or merge)"
            )
        try:
            table = read_table(self.out)
        except LesionsegError as exc:  # predict's advice ("choose another --out") is not review's
            raise LesionsegError(str(exc).replace("; choose another --out", "")) from None
        rows = [row for row in table if isinstance(row.get("file"), str) and isinstance(row.get("mask"), str)]
        self.unreadable = len(table) - len(rows)  # told on start and on the page, never skipped in silence
        if not rows:
            raise LesionsegError(f"{shown(self.out / RECORD)}: no rows to review")
        self.items = [Item(n, Path(row["mask"]).stem, row) for n, row in enumerate(review_order(rows))]
        self.images = Path(images) if images else None
        self.folder = self.out / REVIEW
        self.saved: dict[str, dict[str, Any]] = read_journal(self.folder)
        self.writing = threading.Lock()

    def item(self, index: int) -> Item:
        if not 0 <= index < len(self.items):
            raise DataError(f"no image {index} in this folder of {len(self.items)}")
        return self.items[index]

    def image_path(self, item: Item) -> Path:
        """The input image predict read: its recorded path (relative to here, or to OUT or a folder above it,
        since predict may have run elsewhere), else the file of that name under --images; a file whose size is
        not the recorded one is another photo and is never used."""
        recorded = Path(item.row["file"])
        places = (
            [recorded] if recorded.is_absolute() else [recorded, *(up / recorded for up in self.out.absolute().parents)]
        )
        if self.images:
            places.append(self.images / recorded.name)
        for place in places:
            if place.is_file() and same_input(item.row, place):
                return place
        raise DataError(f"{shown(recorded)}: image not found (pass --images FOLDER where it is now)")

    def saved_entry(self, item: Item) -> dict[str, Any] | None:
        """The journal's last save of this image: of this stem, and of the same input file (an --overwrite run
        may have put another photo under a reviewed stem; its old correction does not belong to the new one)."""
        entry = self.saved.get(item.stem)
        if entry is None or any(entry.get(k) not in (None, item.row.get(k)) for k in IDENTITY):
            return None
        return entry

    def summary(self) -> dict[str, Any]:
        reviewed = sum(1 for item in self.items if self.saved_entry(item))
        corrected = sum(1 for item in self.items if (self.saved_entry(item) or {}).get("action") == "corrected")
        return {
            "folder": shown(self.out),
            "total": len(self.items),
            "flagged": sum(1 for item in self.items if item.flagged),
            "reviewed": reviewed,
            "corrected": corrected,
            "first_open": next((i.index for i in self.items if not self.saved_entry(i)), 0),
            "page_size": PAGE_SIZE,
            "unreadable_rows": self.unreadable,
        }

    def describe(self, item: Item) -> dict[str, Any]:
        status = self.saved_entry(item) or {}
        return {
            "index": item.index,
            "stem": item.stem,
            "file": item.row.get("file"),
            "quality": item.quality,
            "flagged": item.flagged,
            "width": item.row.get("width"),
            "height": item.row.get("height"),
            "status": status.get("action"),
            "row": {k: v for k, v in item.row.items() if not isinstance(v, (dict, list))},
        }

    def page(self, offset: int, limit: int) -> dict[str, Any]:
        limit = max(1, min(limit, PAGE_SIZE))
        chosen = self.items[max(0, offset) : max(0, offset) + limit]
        return {**self.summary(), "offset": offset, "items": [self.describe(item) for item in chosen]}

    def image_jpeg(self, item: Item) -> bytes:
        """The image as the model saw it (EXIF orientation applied), re-encoded for any browser."""
        image, _ = decode_image(self.image_path(item), shown(self.image_path(item)))
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=92)
        return buffer.getvalue()

    def mask_png(self, item: Item) -> bytes:
        """The saved correction where there is one, else the model's mask."""
        saved = self.folder / MASKS / f"{item.stem}.png"
        source = saved if self.saved_entry(item) and saved.is_file() else self.out / MASKS / f"{item.stem}.png"
        mask, _ = read_mask(owned_file(self.out, source), shown(source), allow_empty=True)
        return mask_png_8bit(mask)

    def probability_png(self, item: Item, recompute) -> bytes:
        """predict's saved probability map (a grey PNG inside OUT, decoded and encoded anew), or one recomputed by
        `recompute(image path) -> (H,W) uint8`."""
        saved = self.out / PROBABILITIES / f"{item.stem}.png"
        if saved.is_file() or saved.is_symlink():
            with open_checked(owned_file(self.out, saved), shown(saved), "probability map") as image:
                if image.format != "PNG" or image.mode not in ("L", "I;16", "I"):
                    raise DataError(f"{shown(saved)}: not a grey PNG probability map")
                grey = np.asarray(image.convert("L"))
        else:
            grey = recompute(self.image_path(item))
        buffer = io.BytesIO()
        Image.fromarray(grey).save(buffer, format="PNG")
        return buffer.getvalue()

    def lesion(self, item: Item, mask: np.ndarray) -> dict[str, Any]:
        """The descriptors and the drawing (axes, colour regions) of `mask` on this item's image, nothing saved:
        what the page shows of the mask it holds."""
        image, _ = decode_image(self.image_path(item), shown(self.image_path(item)))
        pixel_mm = item.row.get("pixel_mm")
        measured = measure(image, mask, pixel_mm if isinstance(pixel_mm, (int, float)) and pixel_mm > 0 else None)
        return {"descriptors": measured.columns, "drawing": measured.drawing()}

    def checked_mask(self, item: Item, data: bytes) -> np.ndarray:
        """A mask the page sent: a PNG of this image's own size, bounded in bytes, read by the rule every mask
        follows (0/255 or 0/1, grey, colour or palette)."""
        name = f"mask for {item.stem}"
        if len(data) > MAX_MASK_BYTES:
            raise DataError(f"{name}: {len(data):,} bytes; at most {MAX_MASK_BYTES:,}")
        if not data.startswith(PNG_SIGNATURE):
            raise DataError(f"{name}: not a PNG")
        values, _ = read_mask(io.BytesIO(data), name, allow_empty=True)
        size = (item.row.get("width"), item.row.get("height"))
        if (values.shape[1], values.shape[0]) != size:
            raise DataError(f"{name}: {values.shape[1]}x{values.shape[0]}, but the image is {size[0]}x{size[1]}")
        return values

    def save(self, item: Item, mask: np.ndarray, action: str) -> dict[str, Any]:
        """The mask into OUT/review/masks (atomically), the image linked beside it, one journal line."""
        image = self.image_path(item)  # everything that can fail is checked before the first byte is written
        quality = item.quality if item.quality is not None and np.isfinite(item.quality) else None
        entry = {
            "stem": item.stem,
            "action": action,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "quality": quality,
            "lesion_pixels": int(mask.sum()),
            "model_sha256": item.row.get("model_sha256"),
            **{key: item.row.get(key) for key in IDENTITY},
        }
        line = json.dumps(entry, allow_nan=False) + "\n"
        encoded = mask_png_8bit(mask)
        with self.writing:
            output_folder(self.folder / MASKS)
            output_folder(self.folder / "images")
            write_atomically(self.folder / MASKS / f"{item.stem}.png", lambda handle: handle.write(encoded), "mask")
            link_image(image, self.folder / "images", item.stem)
            append_line(self.folder / JOURNAL, line)
            self.saved[item.stem] = entry
        return {**self.summary(), "item": self.describe(item)}

    def accept(self, item: Item) -> dict[str, Any]:
        """The model's mask as the reviewed one; where a correction of this image is saved, the correction is
        what the page shows and stays (accept keeps what is seen)."""
        if (self.saved_entry(item) or {}).get("action") == "corrected":
            return {**self.summary(), "item": self.describe(item)}
        mask, _ = inspect_mask(self.out / MASKS / f"{item.stem}.png", allow_empty=True)
        return self.save(item, mask, "accepted")


def same_input(row: dict[str, Any], path: Path) -> bool:
    """Whether `path` can be the file predict read for `row`: the same size in bytes where the row records it."""
    recorded = row.get("file_bytes")
    return not isinstance(recorded, int) or path.stat().st_size == recorded


def owned_file(out: Path, path: Path) -> Path:
    """`path` if it is a regular file inside OUT once links are followed: a link planted in a shared OUT must not
    make the page serve a file of the reviewer's from elsewhere."""
    real = path.resolve()
    if not real.is_relative_to(out.resolve()) or not real.is_file():
        raise DataError(f"{shown(path)}: not a file of this folder (a link out of it?); not served")
    return real


def append_line(path: Path, line: str) -> None:
    """One journal line, on a line of its own even after a previous write was cut short (full disk, power loss),
    flushed to disk before the save is reported."""
    with open(path, "a+b") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell():
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                handle.write(b"\n")
        handle.write(line.encode())
        handle.flush()
        os.fsync(handle.fileno())


def link_image(image: Path, folder: Path, stem: str) -> None:
    """OUT/review/images/<stem><ext>: a link to the image, or a copy where links cannot be made; one per stem."""
    for old in folder.glob(f"{stem}.*"):
        if old.stem == stem and old.name != f"{stem}{image.suffix}":
            old.unlink()
    target = folder / f"{stem}{image.suffix}"
    if target.is_symlink() and target.resolve() == image.resolve():
        return
    staged = folder / f".{stem}{image.suffix}.{os.getpid()}.tmp"
    staged.unlink(missing_ok=True)
    try:
        staged.symlink_to(image.resolve())
    except OSError:
        shutil.copyfile(image, staged)
    os.replace(staged, target)  # a stem reused by another photo gets the new photo, never the old one


def refined(mask: np.ndarray, operation: str) -> np.ndarray:
    """The page's two clean-ups, the pipeline's own refinements: fill enclosed holes, or keep the largest piece."""
    if operation not in ("fill_holes", "largest"):
        raise DataError(f"unknown operation {operation!r}; choose fill_holes or largest")
    refine = Refinements(largest_component=operation == "largest", fill_holes=operation == "fill_holes")
    return refined_mask(mask.astype(np.uint8), 1, refine)


def holding(folder: ReviewFolder):
    """One review page per folder at a time: two would interleave their journals."""
    output_folder(folder.folder)
    return locked(folder.folder / LOCK, "the review of this folder")
