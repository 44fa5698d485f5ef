"""Opening images and masks under one policy, shared by every path that reads one (train, evaluate, predict,
serve, the data check). No PyTorch here: inference with an ONNX model needs only Pillow and NumPy.

The policy: the header is read first and a claimed size over MAX_PIXELS is refused before anything is
decoded (a 100 KB PNG can claim 30000x30000 pixels); every failure inside Pillow, whatever its type, becomes
one DataError that names the file.
"""

from __future__ import annotations

import re
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lesionseg import dicom
from lesionseg.errors import DataError, ImageTooLargeError, NotAnImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MAX_PIXELS = 60_000_000  # dermoscopy is at most ~6 MP; far larger is a decompression bomb, not a photo


def is_image_file(path: Path) -> bool:
    """Whether `path` is an image lesionseg reads: decided here alone, by its suffix, or by its content for DICOM
    (whose files often have no suffix at all). Every reader (predict's inputs, describe, training's data) asks."""
    return path.suffix.lower() in IMAGE_SUFFIXES or (path.is_file() and dicom.is_dicom(path))


def open_checked(source: Path | BinaryIO, name: str, what: str = "image") -> Image.Image:
    """Open (header only) under the one policy every path shares: a readable image format whose header
    claims at most MAX_PIXELS pixels. Nothing is decoded yet, so a bomb costs a few bytes of reading. A DICOM
    file is checked by its header the same way, then decoded by `lesionseg.dicom`."""
    if dicom.is_dicom(source):
        return dicom.read_dicom(source, name, MAX_PIXELS)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is lower and says more
            image = Image.open(source)
    except UnidentifiedImageError:
        raise NotAnImageError(f"{name}: not an {what} or damaged (JPEG, PNG, BMP or TIFF expected)") from None
    except Image.DecompressionBombError as exc:  # Pillow's own, higher limit: the header gives only a count
        claimed = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(claimed.group(1)):,} pixels" if claimed else "too many pixels"
        raise ImageTooLargeError(f"{name}: {size} claimed by its header, over the {MAX_PIXELS:,}-pixel limit") from None
    except Exception as exc:  # hostile headers fail in many ways inside Pillow; each means "unusable file"
        raise DataError(f"{name}: cannot read {what} ({exc.__class__.__name__}: {exc})") from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        image.close()
        raise ImageTooLargeError(
            f"{name}: {width}x{height} = {width * height:,} pixels claimed by its header, "
            f"over the {MAX_PIXELS:,}-pixel limit"
        )
    return image


def decode_image(source: Path | BinaryIO, name: str) -> tuple[Image.Image, list[str]]:
    """An 8-bit RGB image as it is meant to be seen (EXIF rotation applied), and what was converted.
    Every failure is a DataError naming `name`: a hostile file never escapes as a traceback."""
    image, notes, _ = decode(source, name)
    return image, notes


def decode_reduced(source: Path | BinaryIO, name: str, min_side: int) -> tuple[Image.Image, tuple[int, int]]:
    """The image decoded at the smallest JPEG scale (1/2, 1/4, 1/8, done inside the decoder, so several times
    faster) that keeps both sides at least `min_side`, and the (width, height) it has at full size. For a
    model that sees 128-256 px this is all it needs; other formats are decoded whole."""
    image, _, full_size = decode(source, name, min_side)
    return image, full_size


def decode(
    source: Path | BinaryIO, name: str, min_side: int | None = None
) -> tuple[Image.Image, list[str], tuple[int, int]]:
    notes = []
    with open_checked(source, name) as im:
        try:
            full_width, full_height = im.size
            if min_side and im.format == "JPEG":
                im.draft(None, (min_side, min_side))
            im.load()  # decode fully now: a truncated file fails here, not halfway through training
            orientation = im.getexif().get(0x0112, 1)
            if orientation != 1:
                notes.append(f"{name}: EXIF orientation {orientation} applied")
            im = ImageOps.exif_transpose(im)
            if orientation in (5, 6, 7, 8):  # a quarter turn swaps the sides
                full_width, full_height = full_height, full_width
            archive = im.info.get(dicom.INFO_KEY)
            im, converted = to_rgb(im, name)
            if archive is not None:
                im.info[dicom.INFO_KEY] = archive
            notes += converted
            return im, notes, (full_width, full_height)
        except Exception as exc:  # truncated data, bad chunks, codec errors: all "cannot read"
            raise DataError(f"{name}: cannot read image ({exc.__class__.__name__}: {exc})") from None


def to_rgb(im: Image.Image, name: str) -> tuple[Image.Image, list[str]]:
    """8-bit RGB from any mode Pillow reads, and what was converted: 16/32-bit integers scaled from 0..65535,
    floats scaled from [0, 1] or read as [0, 255] (any other range refused), the rest converted."""
    notes = []
    if im.mode.startswith("I"):
        notes.append(f"{name}: 16-bit {im.mode} image scaled to 8-bit RGB")
        im = Image.fromarray((np.asarray(im, dtype=np.float64) / 257).clip(0, 255).astype(np.uint8))
    if im.mode == "F":
        im, note = from_float(np.asarray(im), name)
        notes.append(note)
    if im.mode != "RGB":
        notes.append(f"{name}: {im.mode} image converted to RGB")
        im = im.convert("RGB")
    return im, notes


def from_float(values: np.ndarray, name: str) -> tuple[Image.Image, str]:
    """A float image in [0, 1] (the usual convention) or [0, 255], scaled to 8 bits; any other range is refused
    rather than clipped into a black or white picture that would still be segmented."""
    finite = np.isfinite(values)
    if not finite.all():
        raise DataError(f"{name}: float image with {int((~finite).sum())} NaN or infinite pixels")
    low, high = float(values.min()), float(values.max())
    if low >= 0 and high <= 1:
        return Image.fromarray(np.rint(values * 255).astype(np.uint8)), f"{name}: float image in [0, 1] scaled to 8-bit"
    if low >= 0 and high <= 255:
        return Image.fromarray(np.rint(values).astype(np.uint8)), f"{name}: float image in [0, 255] read as 8-bit"
    raise DataError(f"{name}: float image with values from {low:g} to {high:g}; expected [0, 1] or [0, 255]")


def checked_pil(image: Image.Image, name: str) -> Image.Image:
    """A PIL image handed over in memory, under the same policy as a file: the pixel limit, EXIF rotation, RGB."""
    check_pixels(*image.size, name)
    try:
        return to_rgb(ImageOps.exif_transpose(image), name)[0]
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{name}: cannot use image ({exc.__class__.__name__}: {exc})") from None


def check_pixels(width: int, height: int, name: str) -> None:
    """The file policy's pixel limit, for images that arrive as arrays or PIL images too."""
    if width < 1 or height < 1:
        raise DataError(f"{name}: an image of {width}x{height} pixels has nothing to segment")
    if width * height > MAX_PIXELS:
        raise ImageTooLargeError(
            f"{name}: {width}x{height} = {width * height:,} pixels, over the {MAX_PIXELS:,}-pixel limit"
        )


def inspect_image(path: Path) -> tuple[Image.Image, list[str]]:
    return decode_image(path, str(path))


def read_image(path: Path) -> Image.Image:
    """An RGB image, EXIF rotation applied; unreadable files raise DataError naming the file."""
    return inspect_image(path)[0]


def lesion_above(top: int) -> int:
    """The value a mask pixel must exceed to be lesion: 0/1 masks > 0; 8-bit > 128 (the ISIC scorer's rule);
    16-bit > 32768."""
    return 0 if top == 1 else (top + 1) // 2


def inspect_mask(path: Path, allow_empty: bool = False) -> tuple[np.ndarray, list[str]]:
    """A boolean lesion mask from 0/255, 0/1, 16-bit, colour or palette masks (see `read_mask`)."""
    return read_mask(path, str(path), allow_empty)


def mask_values(image: Image.Image) -> np.ndarray:
    """The mask's values as it shows them: a palette by the colours it maps to, never by index; transparency
    (LA, RGBA, PA) is not a value; colour by its brightest channel."""
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    values = np.asarray(image)
    if values.ndim == 3:
        channels = 1 if image.mode in ("LA", "La") else 3
        values = values[..., :channels].max(axis=-1)
    return values


def read_mask(source: Path | BinaryIO, name: str, allow_empty: bool = False) -> tuple[np.ndarray, list[str]]:
    """A boolean lesion mask and notes on what was odd. Lesion is the ISIC scorer's rule for 8-bit masks,
    value > 128, and its equivalent for the others: above half range, or above 0 where the values are 0/1."""
    with open_checked(source, name, "mask") as im:
        try:
            values = mask_values(im)
        except Exception as exc:
            raise DataError(f"{name}: cannot read mask ({exc.__class__.__name__}: {exc})") from None
    if values.ndim != 2 or values.dtype.kind not in "biu":
        raise DataError(f"{name}: cannot read mask (unsupported {values.dtype} pixels)")
    top = 1 if values.max() <= 1 else 255 if values.max() <= 255 else 65535
    levels = np.unique(values)
    notes = (
        []
        if set(levels.tolist()) <= {0, top}
        else [f"{name}: non-binary mask ({len(levels)} levels), lesion where > {lesion_above(top)}"]
    )
    mask = values > lesion_above(top)
    if not (mask.any() or allow_empty):
        raise DataError(f"{name}: empty mask (no lesion pixel)")
    return mask, notes


class PixelBudget:
    """At most `total` pixels of images held at full size at once, across all request threads: many ordinary
    photos proceed together, while images near the pixel limit take their turn one by one, so twelve 60 MP uploads
    at once cost what one does (~10 bytes a pixel while decoding, resizing back and encoding)."""

    def __init__(self, total: int) -> None:
        self.total, self.used = total, 0
        self.changed = threading.Condition()

    @contextmanager
    def hold(self, pixels: int):
        pixels = min(max(pixels, 1), self.total)
        with self.changed:
            self.changed.wait_for(lambda: self.used + pixels <= self.total)
            self.used += pixels
        try:
            yield
        finally:
            with self.changed:
                self.used -= pixels
                self.changed.notify_all()
