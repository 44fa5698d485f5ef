"""What a dermatologist reads off an outlined lesion, measured from a mask and its image at the image's own size:
size (area, largest and smallest diameter), shape asymmetry about the two principal axes, border irregularity and
abruptness, and which of the six dermoscopic colours it holds. Research measurements, not a diagnosis.

Choices, each written down here and in docs/descriptors.md with how it was chosen (training data only):
- Asymmetry: the share of the lesion that does not overlap its mirror image about each principal axis (through
  the centroid, along the eigenvectors of the pixel coordinates' covariance); an axis counts as asymmetric above
  ASYMMETRIC, giving the dermatologist's 0/1/2.
- Border irregularity: compactness 4 pi A / P^2 (the perimeter P a Crofton estimate, unbiased for any edge
  direction) for the notched, wiggly border; and solidity A / convex hull area, robust to a few pixels of mask
  noise (our own errors), for lobes and bays.
- Border abruptness: the lightness step (CIELAB L*) from a band just inside the outline to a band just outside,
  in eight sectors around the centroid; a sector is abrupt above ABRUPT_STEP.
- Colours: each lesion pixel, after Shades of Gray colour constancy (the illuminant estimated from the whole
  image, p = 6), goes to the nearest of six reference colours in CIELAB if within MAX_DELTA_E; a colour is present
  where it covers at least PRESENT_SHARE of the lesion.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from lesionseg.errors import DataError
from lesionseg.files import shown

# The six dermoscopic colours as sRGB, from the colour-detection literature (Seidenari et al. 2005, Barata et al.
# 2015) and checked against HAM10000 training images; converted to CIELAB once below.
COLOURS_RGB = {
    "white": (235, 230, 225),
    "red": (190, 60, 70),
    "light_brown": (185, 125, 85),
    "dark_brown": (100, 55, 35),
    "blue_gray": (105, 115, 140),
    "black": (35, 30, 30),
}
ASYMMETRIC = 0.075  # non-overlapping share above which an axis is asymmetric: chosen on HAM10000 training images
ABRUPT_STEP = 10.0  # L* units between the bands inside and outside the outline for an abrupt sector
SECTORS = 8
MAX_DELTA_E = 30.0  # a pixel farther than this from every reference colour is none of the six
PRESENT_SHARE = 0.05  # a colour is present where it covers this share (1 % separated melanoma a little better on
# HAM10000 training images, 0.640 against 0.615 AUROC, but counts hair and shadow as black: docs/descriptors.md)
MAX_POINTS = 2_000  # lesion pixels sampled for colours and asymmetry: shares to about half a percent

# Every descriptor, declared once (as scikit-image's regionprops declares its properties): every row carries every
# column, None where it cannot be measured (no lesion; no pixel size for the mm columns).
COLUMNS = {
    "area_px": "lesion pixels at the image's own size",
    "diameter_max_px": "largest width (Feret), own pixels",
    "diameter_min_px": "smallest width (caliper), own pixels",
    "compactness": "4 pi area / perimeter^2: 1 for a disc, lower for a notched border",
    "solidity": "area / convex hull area: lower for lobes and bays",
    "area_mm2": "area in mm^2 (with a pixel size)",
    "diameter_max_mm": "largest width in mm (with a pixel size)",
    "diameter_min_mm": "smallest width in mm (with a pixel size)",
    "asymmetry_major": "share of the lesion outside its mirror image about the major axis",
    "asymmetry_minor": "the same about the minor axis",
    "asymmetry_axes": "axes above ASYMMETRIC: the ABCD rule's 0/1/2 (shape only)",
    "border_step_mean": "mean L* step across the outline, eight sectors",
    "border_abrupt_sectors": "sectors whose step exceeds ABRUPT_STEP",
    **{f"colour_{name}": f"share of the lesion nearest to {name.replace('_', ' ')}" for name in COLOURS_RGB},
    "colours": "how many of the six colours cover at least PRESENT_SHARE",
    "colours_present": "their names, space-separated",
}


def declared(values: dict[str, Any]) -> dict[str, Any]:
    """The descriptors in COLUMNS' order, every column present."""
    return {name: values.get(name) for name in COLUMNS}


SRGB_TO_LINEAR = np.where(
    np.arange(256) / 255 <= 0.04045, np.arange(256) / 255 / 12.92, ((np.arange(256) / 255 + 0.055) / 1.055) ** 2.4
).astype(np.float32)  # the sRGB transfer curve for every 8-bit value: a lookup instead of a power per pixel
RGB_TO_XYZ = np.array([[0.4124, 0.2126, 0.0193], [0.3576, 0.7152, 0.1192], [0.1805, 0.0722, 0.9505]], np.float32)
WHITE_D65 = np.array([0.95047, 1.0, 1.08883], np.float32)


def linear_to_lab(linear: np.ndarray) -> np.ndarray:
    """(..., 3) linear RGB in 0..1 -> CIELAB (D65), the CIE formulas."""
    xyz = (linear @ RGB_TO_XYZ) / WHITE_D65
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) sRGB 0..255 -> CIELAB."""
    return linear_to_lab(SRGB_TO_LINEAR[np.clip(np.rint(rgb), 0, 255).astype(np.uint8)])


COLOURS_LAB = srgb_to_lab(np.array(list(COLOURS_RGB.values())))


def neutral_gain(image: np.ndarray, p: int = 6) -> np.ndarray:
    """Shades of Gray: per-channel gains on linear RGB that make the image's p-norm mean grey (the illuminant
    estimated from the whole picture, skin and lesion alike)."""
    linear = SRGB_TO_LINEAR[image.reshape(-1, 3)[:: max(1, image.size // 3 // 2_000)]]
    norm = np.power(np.mean(np.power(linear, p), axis=0), 1 / p) + 1e-6
    return (norm.mean() / norm).astype(np.float32)


def lab_of(image: np.ndarray, rows: np.ndarray, cols: np.ndarray, gain: np.ndarray) -> np.ndarray:
    """CIELAB of the chosen pixels under a neutral illuminant."""
    return linear_to_lab(np.minimum(SRGB_TO_LINEAR[image[rows, cols]] * gain, 1.0))


def diameters(points: np.ndarray) -> tuple[float, float]:
    """Largest (Feret) and smallest (caliper) width of a point set, from its convex hull."""
    if len(points) < 3:  # no hull: the span between the points (pixel centres) plus one pixel
        span = float(np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1)).max()) + 1 if len(points) else 0.0
        return span, float(len(points) > 0)
    try:
        hull = points[ConvexHull(points).vertices]
    except QhullError:  # all on a line: its length, one pixel wide
        return float(np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1)).max()) + 1, 1.0
    largest = float(np.sqrt(((hull[:, None] - hull[None]) ** 2).sum(-1)).max()) + 1
    edges = np.roll(hull, -1, axis=0) - hull
    normals = np.stack([-edges[:, 1], edges[:, 0]], 1) / np.maximum(np.linalg.norm(edges, axis=1, keepdims=True), 1e-9)
    projections = hull @ normals.T  # (vertices, edges): the hull's extent across each edge's normal
    return largest, float(np.ptp(projections, axis=0).min()) + 1


def asymmetry(mask: np.ndarray, points: np.ndarray) -> list[float]:
    """For each principal axis (major first), the share of lesion pixels whose mirror image falls outside it.
    One or two pixels have no principal axes and are symmetric about any line through their centre."""
    if len(points) < 3:
        return [0.0, 0.0]
    centre = points.mean(axis=0)
    _, vectors = np.linalg.eigh(np.cov((points - centre).T))
    major, minor = vectors[:, 1], vectors[:, 0]
    shares = []
    for axis in (major, minor):
        offset = points - centre
        mirrored = centre + 2 * np.outer(offset @ axis, axis) - offset  # reflected about the line along `axis`
        rows, cols = np.rint(mirrored[:, 0]).astype(int), np.rint(mirrored[:, 1]).astype(int)
        inside = (rows >= 0) & (rows < mask.shape[0]) & (cols >= 0) & (cols < mask.shape[1])
        hit = np.zeros(len(points), bool)
        hit[inside] = mask[rows[inside], cols[inside]]
        shares.append(float(1 - hit.mean()))
    return shares


def perimeter(mask: np.ndarray) -> float:
    """Crofton estimate: the 4-connected edge transitions times pi/4, unbiased over edge directions."""
    padded = np.pad(mask, 1)
    transitions = np.count_nonzero(padded[1:] != padded[:-1]) + np.count_nonzero(padded[:, 1:] != padded[:, :-1])
    return transitions * math.pi / 4


def border_steps(image: np.ndarray, mask: np.ndarray, gain: np.ndarray, band: int) -> np.ndarray:
    """Per sector around the centroid: mean L* in a band just outside the outline minus just inside (skin is
    lighter than pigment, so a sharp edge is a large positive step)."""
    inner = np.argwhere(mask & ~ndimage.binary_erosion(mask, iterations=band))
    outer = np.argwhere(ndimage.binary_dilation(mask, iterations=band) & ~mask)
    centre = np.argwhere(mask).mean(axis=0)
    steps = np.full(SECTORS, np.nan)
    sums = []
    for ring in (inner, outer):
        lightness = lab_of(image, ring[:, 0], ring[:, 1], gain)[:, 0]
        angle = np.arctan2(ring[:, 0] - centre[0], ring[:, 1] - centre[1])
        sector = ((angle + math.pi) / (2 * math.pi) * SECTORS).astype(int) % SECTORS
        sums.append((np.bincount(sector, lightness, SECTORS), np.bincount(sector, minlength=SECTORS)))
    (in_sum, in_n), (out_sum, out_n) = sums
    both = (in_n > 0) & (out_n > 0)
    steps[both] = out_sum[both] / out_n[both] - in_sum[both] / in_n[both]
    return steps


def colour_shares(lab: np.ndarray) -> np.ndarray:
    """(N,3) CIELAB lesion pixels -> the share of them nearest each reference colour (within MAX_DELTA_E)."""
    distance = np.sqrt(((lab[:, None, :] - COLOURS_LAB[None].astype(np.float32)) ** 2).sum(-1))
    nearest = distance.argmin(axis=1)
    close = distance[np.arange(len(lab)), nearest] <= MAX_DELTA_E
    return np.bincount(nearest[close], minlength=len(COLOURS_RGB)) / max(len(lab), 1)


def at_size(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """The mask sampled (nearest) at another size: the image it is read with may be a reduced decode."""
    if mask.shape == (height, width):
        return mask
    rows = np.minimum((np.arange(height) + 0.5) * mask.shape[0] / height, mask.shape[0] - 1).astype(int)
    cols = np.minimum((np.arange(width) + 0.5) * mask.shape[1] / width, mask.shape[1] - 1).astype(int)
    return mask[rows][:, cols]


def geometry(mask: np.ndarray, scale: tuple[float, float], area: int, pixel_mm: float | None) -> dict[str, Any]:
    """Size and border shape from the mask at the working resolution, lengths in the image's own pixels
    (`scale`: own pixels per working pixel, rows and columns); `area` counted at the own size."""
    edge = mask & ~ndimage.binary_erosion(mask)
    centres = np.argwhere(edge).astype(np.float64) * scale  # pixel centres, in own-size units
    largest, smallest = diameters(centres)
    largest, smallest = largest - 1 + max(scale), smallest - 1 + min(scale)  # centres to outer edges
    try:
        hull_area = ConvexHull(centres).volume / (scale[0] * scale[1]) if len(centres) >= 3 else mask.sum()
    except QhullError:
        hull_area = mask.sum()
    out = {
        "area_px": area,
        "diameter_max_px": round(float(largest), 2),
        "diameter_min_px": round(float(smallest), 2),
        "compactness": round(float(min(1.0, 4 * math.pi * mask.sum() / perimeter(mask) ** 2)), 4),
        "solidity": round(float(min(1.0, mask.sum() / max(hull_area, 1.0))), 4),
    }
    if pixel_mm:
        out |= {
            "area_mm2": round(area * pixel_mm**2, 3),
            "diameter_max_mm": round(largest * pixel_mm, 3),
            "diameter_min_mm": round(smallest * pixel_mm, 3),
        }
    return out


def describe_lesion(image: np.ndarray, mask: np.ndarray, pixel_mm: float | None = None) -> dict[str, Any]:
    """(h,w,3) uint8 RGB image (the image, or a reduced decode of it: predict passes what it decoded for the
    model, about 128-256 px) and its (H,W) bool mask at the image's own size -> the descriptors, flat (one table
    column each). Everything is read at the image's resolution (the mask sampled to it), lengths reported in the
    image's own pixels; the area is counted at the own size. Every column of COLUMNS, None where not measured."""
    area = int(np.count_nonzero(mask))
    if area == 0:
        return declared({"area_px": 0})
    small = at_size(mask, image.shape[0], image.shape[1])
    if not small.any():  # a lesion smaller than one pixel of the reduced image
        return declared({"area_px": area})
    scale = (mask.shape[0] / image.shape[0], mask.shape[1] / image.shape[1])
    out = geometry(small, scale, area, pixel_mm)
    points = np.argwhere(small).astype(np.float64)
    sample = points[:: max(1, len(points) // MAX_POINTS)]
    axes = asymmetry(small, sample)
    out |= {
        "asymmetry_major": round(axes[0], 4),
        "asymmetry_minor": round(axes[1], 4),
        "asymmetry_axes": sum(a > ASYMMETRIC for a in axes),
    }
    gain = neutral_gain(image)
    band = max(1, round(math.sqrt(len(points) / math.pi) * 0.1))  # a tenth of the equivalent radius
    steps = border_steps(image, small, gain, band)
    out["border_step_mean"] = round(float(np.nanmean(steps)), 3) if np.isfinite(steps).any() else None
    out["border_abrupt_sectors"] = int(np.sum(np.nan_to_num(steps) > ABRUPT_STEP))
    rows, cols = sample[:, 0].astype(int), sample[:, 1].astype(int)
    shares = colour_shares(lab_of(image, rows, cols, gain))
    for name, share in zip(COLOURS_RGB, shares):
        out[f"colour_{name}"] = round(float(share), 4)
    out["colours"] = int(np.sum(shares >= PRESENT_SHARE))
    out["colours_present"] = " ".join(name for name, share in zip(COLOURS_RGB, shares) if share >= PRESENT_SHARE)
    return declared(out)


PICTURE_PIXELS = 16_384  # colours and borders are read from a copy at most this large: plenty for shares


def picture_of(image) -> np.ndarray:
    """(h,w,3) uint8 of a PIL image (often already a reduced decode), reduced further past PICTURE_PIXELS."""
    factor = math.ceil(math.sqrt(image.width * image.height / PICTURE_PIXELS))
    if factor > 1:
        image = image.reduce(factor)
    return np.asarray(image.convert("RGB") if image.mode != "RGB" else image)


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
