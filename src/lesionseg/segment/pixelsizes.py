"""Millimetres per pixel, for the descriptors' mm columns: one value for every image or a CSV per image."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

from lesionseg.errors import DataError
from lesionseg.files import shown


class PixelSizes:
    """Millimetres per pixel: one value for every image (`--pixel-size 0.02`), or per image from a CSV with
    columns `image` (file name or stem) and `pixel_mm` (a dermoscope's field of view divided by the image width)."""

    def __init__(self, value: str | float | None = None) -> None:
        self.constant: float | None = None
        self.by_stem: dict[str, float] = {}
        if value is None:
            return
        try:
            self.constant = self.checked(float(value), "--pixel-size")
        except ValueError:
            self.by_stem = self.read(Path(str(value)))

    @staticmethod
    def checked(value: float, where: str) -> float:
        if not (math.isfinite(value) and 0 < value < 10):
            raise DataError(f"{where}: pixel size {value} mm is not in (0, 10)")
        return value

    def read(self, path: Path) -> dict[str, float]:
        if not path.is_file():
            raise DataError(f"{shown(path)}: neither a pixel size in mm nor a CSV file")
        try:
            with open(path, newline="", encoding="utf-8-sig") as handle:  # Excel's "CSV UTF-8" starts with a BOM
                rows = list(csv.DictReader(handle))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise DataError(f"{shown(path)}: cannot read ({exc.__class__.__name__})") from None
        if not rows or not {"image", "pixel_mm"} <= set(rows[0]):
            raise DataError(f"{shown(path)}: needs the columns image and pixel_mm")
        sizes = {}
        for n, row in enumerate(rows, 2):
            try:
                sizes[Path((row["image"] or "").strip()).stem] = self.checked(
                    float(row["pixel_mm"]), f"{shown(path)} line {n}"
                )
            except (TypeError, ValueError):
                raise DataError(f"{shown(path)} line {n}: pixel_mm {row['pixel_mm']!r} is not a number") from None
        return sizes

    def of(self, stem: str, name: str | None = None) -> float | None:
        """The size for an image, looked up by its file's own stem (spaces and all) or by its output stem."""
        own = Path(name).stem if name else stem
        return self.by_stem.get(own, self.by_stem.get(stem, self.constant))

    def tell_missing(self, images: list[tuple[str, str]]) -> None:
        """Images a pixel-size CSV does not name get no millimetres: said on stderr, never in silence."""
        if not self.by_stem:
            return
        missing = [name for name, stem in images if self.of(stem, name) is None]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            print(
                f"lesionseg: {len(missing)} image(s) not in the pixel-size CSV, measured in pixels only: "
                f"{', '.join(shown(m) for m in missing[:5])}{more}",
                file=sys.stderr,
            )
