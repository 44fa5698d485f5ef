"""DICOM dermoscopy and VL photographic images, read like any other image (`pip install '.[dicom]'`).

`images.open_checked` sends a file here when it is DICOM (the "DICM" preamble at byte 128, or a .dcm name), so
predict, serve, review, describe and training read DICOM without knowing it. The header is checked before a
pixel is decoded (one colour frame, 8 bits, at most MAX_PIXELS), the pixels are decoded by pydicom's installed
handlers (Pillow for baseline JPEG and JPEG 2000, pylibjpeg for JPEG-LS and the rest), YBR converted to RGB, and
the image carries the UIDs that join a result back to the archive and the pixel spacing the file states.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from lesionseg.errors import DataError, ImageTooLargeError, LesionsegError

SUFFIXES = (".dcm", ".dicom")
PREAMBLE = 128  # bytes before the "DICM" magic of a DICOM file (Part 10)
MAGIC = b"DICM"
INFO_KEY = "dicom"  # PIL Image.info key of what the file says of itself (UIDs, pixel spacing)
INSTALL = "reading DICOM needs the dicom extra: pip install 'lesionseg[dicom]' (pydicom, highdicom, pylibjpeg)"


def is_dicom(source: Path | BinaryIO) -> bool:
    """A DICOM file by its content (the preamble's magic); a file named .dcm counts too, so that a broken one is
    named as broken DICOM rather than skipped as no image at all."""
    if isinstance(source, (str, Path)):
        if Path(source).suffix.lower() in SUFFIXES:
            return True
        if not Path(source).is_file():  # a FIFO would block the read; a broken link has nothing to read
            return False
        try:
            with open(source, "rb") as handle:
                head = handle.read(PREAMBLE + len(MAGIC))
        except OSError:
            return False
    else:
        at = source.tell()
        head = source.read(PREAMBLE + len(MAGIC))
        source.seek(at)
    return head[PREAMBLE:] == MAGIC


def pydicom_module(name: str):
    """pydicom, or one line naming the file that needs it (the other images of a folder are still read)."""
    try:
        import pydicom
    except ImportError:
        raise DataError(f"{name}: {INSTALL}") from None
    return pydicom


def read_header(source: Path | BinaryIO, name: str):
    """The dataset without its pixels; anything unreadable is one line naming the file."""
    pydicom = pydicom_module(name)
    try:
        return pydicom.dcmread(source, stop_before_pixels=True)
    except Exception as exc:  # truncated, not DICOM, bad elements: all "cannot read"
        raise DataError(f"{name}: cannot read DICOM ({exc.__class__.__name__}: {str(exc)[:120]})") from None


def checked_header(ds, name: str, max_pixels: int) -> None:
    """One colour frame of 8-bit pixels no larger than the pixel limit, or one line saying what it is instead."""
    if "Rows" not in ds or "Columns" not in ds:
        refuse_no_pixels(ds, name)
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows * columns > max_pixels:
        raise ImageTooLargeError(
            f"{name}: {columns}x{rows} = {rows * columns:,} pixels claimed by its header, over the {max_pixels:,}-pixel limit"
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise DataError(f"{name}: {frames} frames; lesionseg reads single-frame dermoscopy images")
    samples, bits = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.get("BitsAllocated", 8) or 8)
    if samples != 3 or bits != 8:
        photometric = ds.get("PhotometricInterpretation", "?")
        raise DataError(
            f"{name}: a {bits}-bit {photometric} image with {samples} sample(s) per pixel; "
            "lesionseg reads 8-bit colour (RGB or YBR) dermoscopy images"
        )


def refuse_no_pixels(ds, name: str) -> None:
    """A DICOMDIR, a structured report or any object without an image: one line saying which."""
    if "DirectoryRecordSequence" in ds:
        raise DataError(f"{name}: a DICOMDIR (an index of other files), not an image")
    kind = ds.SOPClassUID.name if "SOPClassUID" in ds else "DICOM"
    raise DataError(f"{name}: a {kind} object without pixel data, not an image")


def archive_identity(ds) -> dict[str, Any]:
    """What joins a result back to the archive, and the pixel spacing the file states (mm per pixel)."""
    info = {
        "sop_instance_uid": str(ds.get("SOPInstanceUID", "")) or None,
        "series_instance_uid": str(ds.get("SeriesInstanceUID", "")) or None,
        "study_instance_uid": str(ds.get("StudyInstanceUID", "")) or None,
        "sop_class_uid": str(ds.get("SOPClassUID", "")) or None,
    }
    return info | {"pixel_mm": stated_spacing(ds)}


def stated_spacing(ds) -> float | None:
    """Millimetres per pixel from PixelSpacing (or ImagerPixelSpacing): one number where rows and columns agree
    within 1 %, else none (a non-square pixel has no single size)."""
    for key in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"):
        value = ds.get(key)
        if value is None:
            continue
        try:
            row, column = (float(v) for v in value)
        except (TypeError, ValueError):
            return None
        if 0 < row < 10 and 0 < column < 10 and abs(row - column) <= 0.01 * max(row, column):
            return (row + column) / 2
        return None
    return None


def read_dicom(source: Path | BinaryIO, name: str, max_pixels: int):
    """A PIL RGB image of the file's one frame, `info["dicom"]` holding `archive_identity`."""
    from PIL import Image

    pydicom = pydicom_module(name)
    if not isinstance(source, (str, Path)):
        source = io.BytesIO(source.read())
    header = read_header(source, name)
    checked_header(header, name, max_pixels)
    if not isinstance(source, (str, Path)):
        source.seek(0)
    try:
        ds = pydicom.dcmread(source)
        if "PixelData" not in ds:
            refuse_no_pixels(ds, name)
        if baseline_jpeg(ds):  # the frame is a JPEG file: Pillow decodes it at the scale the model needs
            from pydicom.encaps import generate_frames

            image = Image.open(io.BytesIO(next(generate_frames(ds.PixelData, number_of_frames=1))))
            if image.size != (int(ds.Columns), int(ds.Rows)) or image.mode != "RGB":
                raise DataError(f"{name}: its JPEG frame is {image.size[0]}x{image.size[1]} {image.mode}, not the "
                                f"{ds.Columns}x{ds.Rows} colour image its header states")  # fmt: skip
            image.info[INFO_KEY] = archive_identity(header)
            return image
        pixels = ds.pixel_array  # YBR is converted to RGB by pydicom (its default)
    except DataError:
        raise
    except Exception as exc:  # a transfer syntax nothing installed decodes, truncated pixel data, ...
        syntax = getattr(getattr(header, "file_meta", None), "TransferSyntaxUID", None)
        said = f"transfer syntax {syntax.name}: " if syntax is not None else ""
        raise DataError(
            f"{name}: cannot decode the DICOM pixels ({said}{exc.__class__.__name__}: {str(exc)[:120]})"
        ) from None
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise DataError(f"{name}: DICOM pixels of shape {pixels.shape} and type {pixels.dtype}; expected one RGB frame")
    image = Image.fromarray(np.ascontiguousarray(pixels), "RGB")
    image.info[INFO_KEY] = archive_identity(header)
    return image


def baseline_jpeg(ds) -> bool:
    """One 8-bit colour frame stored as baseline JPEG: a complete JPEG file Pillow reads as it is (and decodes at a
    reduced DCT scale, as it does a .jpg), colour-converted as its own markers say."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return str(syntax) == "1.2.840.10008.1.2.4.50" and ds.get("PhotometricInterpretation") in (
        "YBR_FULL_422",
        "YBR_FULL",
    )


def stated_pixel_mm(path: Path) -> float | None:
    """The pixel spacing a DICOM file states (None for other files, or where it states none)."""
    if not is_dicom(path):
        return None
    try:
        return stated_spacing(read_header(path, str(path)))
    except LesionsegError:
        return None
