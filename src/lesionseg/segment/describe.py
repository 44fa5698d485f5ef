"""`lesionseg describe --images DIR --masks DIR`: the lesion descriptors of masks from anywhere (an expert's,
another tool's), one row per image, as predict writes them."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lesionseg.errors import DataError, LesionsegError
from lesionseg.files import output_folder, shown, unusable
from lesionseg.images import IMAGE_SUFFIXES, inspect_mask, is_image_file
from lesionseg.segment.descriptors import PixelSizes, describe
from lesionseg.segment.outputs import write_table
from lesionseg.segment.pipeline import read_for_model

READ_SIZE = 512  # images are decoded reduced to at least this (JPEG's draft mode): colours need no more


def mask_of(image: Path, masks: Path) -> Path | None:
    """masks/<stem>.png, or the ISIC name masks/<stem>_Segmentation.png."""
    for name in (f"{image.stem}.png", f"{image.stem}_Segmentation.png"):
        if (masks / name).is_file():
            return masks / name
    return None


def image_files(images: Path, masks: Path) -> tuple[list[Path], list[str]]:
    """The images to describe, and the files among them that cannot be read (named, never dropped in silence).
    Where images and masks share a folder, a file that is another image's mask is not an image."""
    if not images.is_dir():
        raise DataError(f"{shown(images)}: not a folder (--images names the folder of images)")
    try:
        candidates = sorted(p for p in images.iterdir() if is_image_file(p))
    except OSError as exc:
        raise DataError(f"{shown(images)}: cannot list ({exc.strerror or exc})") from None
    problems = [f"{shown(p)}: {unusable(p)}" for p in candidates if unusable(p)]
    readable = [p for p in candidates if not unusable(p)]
    masks_here = {m.resolve() for p in readable if (m := mask_of(p, masks)) is not None and m.resolve() != p.resolve()}
    files = [p for p in readable if p.resolve() not in masks_here]
    if not files:
        raise DataError(f"{shown(images)}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    return files, problems


def describe_pair(image: Path, mask_path: Path, pixel_mm: float | None) -> dict[str, Any]:
    picture, (width, height), _ = read_for_model(image, shown(image), READ_SIZE)
    mask, _ = inspect_mask(mask_path, allow_empty=True)
    if mask.shape != (height, width):
        raise DataError(
            f"{shown(mask_path)}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is {width}x{height}"
        )
    return {"file": shown(image), "mask": shown(mask_path), "width": width, "height": height} | describe(
        picture, mask, pixel_mm
    )


def run_describe(images: str | os.PathLike, masks: str | os.PathLike, out: str | os.PathLike,
                 pixel_size: str | None = None, progress: bool = True) -> tuple[list[dict], list[str]]:  # fmt: skip
    """Every image of `images` with a mask in `masks`: its descriptors into OUT (.csv, and .json beside it). A
    pair that cannot be read is named on stderr and left out; an image without a mask is named too."""
    images, masks, out = Path(images), Path(masks), Path(out)
    if out.suffix.lower() != ".csv":
        raise LesionsegError(f"{shown(out)}: the table's name must end in .csv (its .json is written beside it)")
    output_folder(out.parent)
    sizes = PixelSizes(pixel_size)
    files, problems = image_files(images, masks)
    for line in problems:
        print(f"lesionseg: skipped {line}", file=sys.stderr)
    rows = []
    for image in tqdm(files, desc="describe", unit="image", disable=not progress):
        mask = mask_of(image, masks)
        try:
            if mask is None:
                raise DataError(f"{shown(image)}: no mask in {shown(masks)} ({image.stem}.png)")
            rows.append(describe_pair(image, mask, sizes.of(image.stem)))
        except DataError as exc:
            problems.append(str(exc))
            print(f"lesionseg: skipped {exc}", file=sys.stderr)
    write_table(out, rows)
    return rows, problems
