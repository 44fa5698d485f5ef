"""What a dermatologist reads off an outlined lesion, measured from a mask and its image at the image's own size:
size (area, largest and smallest diameter), asymmetry of shape, colour and structure about the two principal axes,
border irregularity and abruptness, and which of the six dermoscopic colours it holds (read against the skin
around it: `colours.py`). Research measurements, not a diagnosis.

Choices, each written down here and in docs/descriptors.md with how it was chosen (training data only):
- Asymmetry, as the ABCD rule weighs it: about each principal axis (through the centroid, along the eigenvectors
  of the pixel coordinates' covariance), three differences between the halves: the shape (the share of the lesion
  outside its mirror image), the colours (total variation distance between the halves' colour histograms) and
  the structure (the same between their histograms of local contrast, the standard deviation of L* in 3x3
  pixels). An axis is asymmetric when any of the three passes its line; the count is the rule's 0/1/2. A round
  lesion with pigment on one side is asymmetric here, as it is to a dermatologist.
- Border irregularity: compactness 4 pi A / P^2 (the perimeter P a Crofton estimate, unbiased for any edge
  direction) for the notched, wiggly border; and solidity A / convex hull area, robust to a few pixels of mask
  noise (our own errors), for lobes and bays.
- Border abruptness: the lightness step (L*, adapted to the skin) from a band just inside the outline to a band
  just outside, in eight sectors around the centroid; a sector is abrupt above ABRUPT_STEP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import pdist

from lesionseg.segment.colours import COLOURS, IGNORED, NONE, ColourReading, distance_outside, read_colours
from lesionseg.segment.pixelsizes import PixelSizes  # noqa: F401  (callers import it from here)

ASYMMETRIC = {"shape": 0.075, "colour": 0.20, "texture": 0.30}  # per axis, the line each difference must pass:
# chosen on HAM10000 training images (docs/descriptors.md)
ABRUPT_STEP = 10.0  # L* units between the bands inside and outside the outline for an abrupt sector
SECTORS = 8
CONTRAST_EDGES = (1.5, 3.0, 6.0)  # L* standard deviation in 3x3: smooth, fine, coarse, sharp structure
MIN_HALF = 20  # readable pixels each half needs before its colours or structure are compared
MAX_POINTS = 2_000  # lesion pixels sampled for colours and asymmetry: shares to about half a percent

# Every descriptor, declared once (as scikit-image's regionprops declares its properties): every row carries every
# column, None where it cannot be measured (no lesion; no pixel size for the mm columns).
COLUMNS = {
    "lesion_pixels": "lesion pixels at the image's own size",
    "diameter_max_px": "largest width (Feret), own pixels",
    "diameter_min_px": "smallest width (caliper), own pixels",
    "compactness": "4 pi area / perimeter^2: 1 for a disc, lower for a notched border",
    "solidity": "area / convex hull area: lower for lobes and bays",
    "area_mm2": "area in mm^2 (with a pixel size)",
    "diameter_max_mm": "largest width in mm (with a pixel size)",
    "diameter_min_mm": "smallest width in mm (with a pixel size)",
    "asymmetry_major": "shape: share of the lesion outside its mirror image about the major axis",
    "asymmetry_minor": "shape: the same about the minor axis",
    "asymmetry_colour_major": "colour: total variation distance between the colours of the halves either side of the major axis",
    "asymmetry_colour_minor": "colour: the same for the minor axis",
    "asymmetry_texture_major": "structure: the same between the halves' local contrast, major axis",
    "asymmetry_texture_minor": "structure: the same, minor axis",
    "asymmetry_shape_axes": "axes asymmetric in shape alone (0/1/2)",
    "asymmetry_axes": "axes asymmetric in shape, colour or structure: the ABCD rule's 0/1/2",
    "border_step_mean": "mean L* step across the outline, eight sectors",
    "border_abrupt_sectors": "sectors whose step exceeds ABRUPT_STEP",
    **{
        f"colour_{name}": f"share of the lesion's readable pixels that are {name.replace('_', ' ')}" for name in COLOURS
    },
    "colours": "how many of the six colours are present (each at its own share)",
    "colours_present": "their names, space-separated",
    "colour_unreadable": "share of the lesion left out of the colours: reflections, bubbles, hair, vignette",
}


def declared(values: dict[str, Any]) -> dict[str, Any]:
    """The descriptors in COLUMNS' order, every column present."""
    return {name: values.get(name) for name in COLUMNS}


def row_ends(mask: np.ndarray) -> np.ndarray:
    """The first and last lesion pixel of each row, (row, column) pairs: they hold every vertex of the lesion's
    convex hull, in a few hundred points however large the lesion."""
    rows = np.flatnonzero(mask.any(axis=1))
    first = mask[rows].argmax(axis=1)
    last = mask.shape[1] - 1 - mask[rows, ::-1].argmax(axis=1)
    single = first == last  # a one-pixel row: its one end once
    return np.concatenate([np.stack([rows, first], 1), np.stack([rows[~single], last[~single]], 1)])


def hull_of(points: np.ndarray) -> np.ndarray | None:
    """The convex hull's vertices in order, or None where there is no hull (fewer than 3 points, all on a line)."""
    if len(points) < 3:
        return None
    try:
        return points[ConvexHull(points).vertices]
    except QhullError:
        return None


def diameters(points: np.ndarray, hull: np.ndarray | None) -> tuple[float, float]:
    """Largest (Feret) and smallest (caliper) width of a point set, from its convex hull."""
    if hull is None:  # no hull: the span between the points (pixel centres) plus one pixel, one pixel wide
        span = float(pdist(points).max()) + 1 if len(points) > 1 else float(len(points))
        return span, float(len(points) > 0)
    largest = float(pdist(hull).max()) + 1
    edges = np.roll(hull, -1, axis=0) - hull
    normals = np.stack([-edges[:, 1], edges[:, 0]], 1) / np.maximum(np.linalg.norm(edges, axis=1, keepdims=True), 1e-9)
    projections = hull @ normals.T  # (vertices, edges): the hull's extent across each edge's normal
    return largest, float(np.ptp(projections, axis=0).min()) + 1


def polygon_area(vertices: np.ndarray) -> float:
    """The shoelace formula, for the hull's ordered vertices."""
    x, y = vertices[:, 0], vertices[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


@dataclass
class Axes:
    """The lesion's principal axes: its centroid and the two unit directions (major first), in picture pixels."""

    centre: np.ndarray
    directions: tuple[np.ndarray, np.ndarray]

    @classmethod
    def of(cls, points: np.ndarray) -> Axes:
        centre = points.mean(axis=0)
        if len(points) < 3:  # one or two pixels: no principal axes; any pair of perpendicular lines
            return cls(centre, (np.array([0.0, 1.0]), np.array([1.0, 0.0])))
        _, vectors = np.linalg.eigh(np.cov((points - centre).T))
        return cls(centre, (vectors[:, 1], vectors[:, 0]))

    def mirrored_share(self, mask: np.ndarray, points: np.ndarray, axis: int) -> float:
        """Share of `points` whose mirror image about the axis falls outside the mask."""
        direction = self.directions[axis]
        offset = points - self.centre
        mirrored = self.centre + 2 * np.outer(offset @ direction, direction) - offset
        rows, cols = np.rint(mirrored[:, 0]).astype(int), np.rint(mirrored[:, 1]).astype(int)
        inside = (rows >= 0) & (rows < mask.shape[0]) & (cols >= 0) & (cols < mask.shape[1])
        hit = np.zeros(len(points), bool)
        hit[inside] = mask[rows[inside], cols[inside]]
        return float(1 - hit.mean())

    def side(self, points: np.ndarray, axis: int) -> np.ndarray:
        """Which half each point lies in: True on the positive side of the line along `axis`."""
        return (points - self.centre) @ self.directions[1 - axis] > 0


def halves_distance(labels: np.ndarray, side: np.ndarray, bins: int) -> float:
    """Total variation distance between the label histograms of the two halves (labels >= bins are left out);
    0 where a half has fewer than MIN_HALF readable pixels."""
    readable = labels < bins
    one, other = labels[readable & side], labels[readable & ~side]
    if len(one) < MIN_HALF or len(other) < MIN_HALF:
        return 0.0
    p = np.bincount(one, minlength=bins) / len(one)
    q = np.bincount(other, minlength=bins) / len(other)
    return float(0.5 * np.abs(p - q).sum())


def local_contrast(lightness: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Standard deviation of L* over 3x3 pixels at the chosen pixels, binned by CONTRAST_EDGES: the structure."""
    mean = ndimage.uniform_filter(lightness, 3)[rows, cols]
    spread = np.sqrt(np.maximum(ndimage.uniform_filter(lightness * lightness, 3)[rows, cols] - mean * mean, 0))
    return np.digitize(spread, CONTRAST_EDGES).astype(np.uint8)


def asymmetry(mask: np.ndarray, points: np.ndarray, reading: ColourReading, axes: Axes) -> dict[str, Any]:
    """Shape, colour and structure differences about each principal axis, and the 0/1/2 counts."""
    rows, cols = points[:, 0].astype(int), points[:, 1].astype(int)
    colours = reading.classes[rows, cols]
    structure = np.where(colours == IGNORED, 255, local_contrast(reading.lightness, rows, cols))
    out, shape_axes, any_axes = {}, 0, 0
    for axis, name in enumerate(("major", "minor")):
        side = axes.side(points, axis)
        measured = {
            "shape": axes.mirrored_share(mask, points, axis) if len(points) >= 3 else 0.0,
            "colour": halves_distance(colours, side, NONE + 1),
            "texture": halves_distance(structure, side, len(CONTRAST_EDGES) + 1),
        }
        out[f"asymmetry_{name}"] = round(measured["shape"], 4)
        out[f"asymmetry_colour_{name}"] = round(measured["colour"], 4)
        out[f"asymmetry_texture_{name}"] = round(measured["texture"], 4)
        shape_axes += measured["shape"] > ASYMMETRIC["shape"]
        any_axes += any(measured[kind] > ASYMMETRIC[kind] for kind in ASYMMETRIC)
    return out | {"asymmetry_shape_axes": int(shape_axes), "asymmetry_axes": int(any_axes)}


def perimeter(mask: np.ndarray) -> float:
    """Crofton estimate: the 4-connected edge transitions times pi/4, unbiased over edge directions."""
    padded = np.pad(mask, 1)
    transitions = np.count_nonzero(padded[1:] != padded[:-1]) + np.count_nonzero(padded[:, 1:] != padded[:, :-1])
    return transitions * math.pi / 4


def border_steps(lightness: np.ndarray, mask: np.ndarray, outside: np.ndarray, band: int) -> np.ndarray:
    """Per sector around the centroid: mean L* in a band just outside the outline minus just inside (skin is
    lighter than pigment, so a sharp edge is a large positive step). `outside`: colours.distance_outside."""
    inside = ndimage.distance_transform_cdt(mask, metric="taxicab")
    inner = np.argwhere(mask & (inside <= band))
    outer = np.argwhere((outside > 0) & (outside <= band))
    centre = np.argwhere(mask).mean(axis=0)
    steps = np.full(SECTORS, np.nan)
    sums = []
    for ring in (inner, outer):
        values = lightness[ring[:, 0], ring[:, 1]]
        angle = np.arctan2(ring[:, 0] - centre[0], ring[:, 1] - centre[1])
        sector = ((angle + math.pi) / (2 * math.pi) * SECTORS).astype(int) % SECTORS
        sums.append((np.bincount(sector, values, SECTORS), np.bincount(sector, minlength=SECTORS)))
    (in_sum, in_n), (out_sum, out_n) = sums
    both = (in_n > 0) & (out_n > 0)
    steps[both] = out_sum[both] / out_n[both] - in_sum[both] / in_n[both]
    return steps


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
    centres = row_ends(mask).astype(np.float64) * scale  # pixel centres, in own-size units
    hull = hull_of(centres)
    largest, smallest = diameters(centres, hull)
    largest, smallest = largest - 1 + max(scale), smallest - 1 + min(scale)  # centres to outer edges
    hull_area = polygon_area(hull) / (scale[0] * scale[1]) if hull is not None else mask.sum()
    out = {
        "lesion_pixels": area,
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


def colour_columns(reading: ColourReading, small: np.ndarray) -> dict[str, Any]:
    shares = reading.shares(small)
    present = reading.present(shares)
    return {
        **{f"colour_{name}": round(float(share), 4) for name, share in zip(COLOURS, shares)},
        "colours": len(present),
        "colours_present": " ".join(present),
        "colour_unreadable": round(float(np.mean(reading.classes[small] == IGNORED)), 4),
    }


@dataclass
class Measurement:
    """One lesion's descriptors (`columns`, every one of COLUMNS) and what a page draws to show why."""

    columns: dict[str, Any]
    picture_shape: tuple[int, int] = (0, 0)
    scale: tuple[float, float] = (1.0, 1.0)  # own pixels per picture pixel (rows, columns)
    axes: Axes | None = None
    extent: float = 0.0  # half the largest diameter, picture pixels
    reading: ColourReading | None = None
    lesion: np.ndarray | None = None  # the mask at the picture's size

    def drawing(self) -> dict[str, Any]:
        """The two axes (ends in the image's own pixels, x then y, and what made each asymmetric) and the colour
        regions as a small class map (row-major, picture size; COLOURS' index, 6 none, 7 left out, 255 outside
        the lesion)."""
        if self.axes is None or self.reading is None or self.lesion is None:
            return {}
        lines = []
        for axis, name in enumerate(("major", "minor")):
            ends = [self.axes.centre + sign * self.extent * self.axes.directions[axis] for sign in (-1, 1)]
            why = [kind for kind in ASYMMETRIC if (self.columns[f"asymmetry_{'' if kind == 'shape' else kind + '_'}{name}"]
                                                    > ASYMMETRIC[kind])]  # fmt: skip
            lines.append({"axis": name, "ends": [[float((e[1] + 0.5) * self.scale[1]), float((e[0] + 0.5) * self.scale[0])]
                                                 for e in ends],
                          "asymmetric_in": why})  # fmt: skip
        height, width = self.picture_shape
        classes = np.where(self.lesion, self.reading.classes, 255)
        return {
            "axes": lines,
            "colours": list(COLOURS),
            "classes_size": [width, height],
            "classes": classes.ravel().tolist(),
        }


def measure(image, mask: np.ndarray, pixel_mm: float | None = None) -> Measurement:
    """The lesion of an image (PIL or (h,w,3) uint8 RGB, at its own size or a reduced decode; reduced further to
    at most PICTURE_PIXELS) and its (H,W) bool mask at the image's own size. Everything is read at the picture's
    resolution (the mask sampled to it), lengths reported in the image's own pixels; the area counted at the own
    size. Every column of COLUMNS, None where not measured."""
    area = int(np.count_nonzero(mask))
    if area == 0:
        return Measurement(declared({"lesion_pixels": 0}))
    picture = picture_of(image)
    small = at_size(mask, picture.shape[0], picture.shape[1])
    if not small.any():  # a lesion smaller than one pixel of the reduced image
        return Measurement(declared({"lesion_pixels": area}))
    scale = (mask.shape[0] / picture.shape[0], mask.shape[1] / picture.shape[1])
    out = geometry(small, scale, area, pixel_mm)
    outside = distance_outside(small)
    reading = read_colours(picture, small, outside)
    points = np.argwhere(small).astype(np.float64)
    sample = points[:: max(1, len(points) // MAX_POINTS)]
    axes = Axes.of(sample)
    out |= asymmetry(small, sample, reading, axes)
    band = max(1, round(math.sqrt(len(points) / math.pi) * 0.1))  # a tenth of the equivalent radius
    steps = border_steps(reading.lightness, small, outside, band)
    out["border_step_mean"] = round(float(np.nanmean(steps)), 3) if np.isfinite(steps).any() else None
    out["border_abrupt_sectors"] = int(np.sum(np.nan_to_num(steps) > ABRUPT_STEP))
    out |= colour_columns(reading, small)
    extent = out["diameter_max_px"] / 2 / max(scale)
    return Measurement(declared(out), small.shape, scale, axes, extent, reading, small)


def describe(image, mask: np.ndarray, pixel_mm: float | None = None) -> dict[str, Any]:
    """The descriptors of one lesion as one table row: `measure(...).columns`. What every caller uses (predict,
    the API, the service, `lesionseg describe`), so that each reads the same picture the same way."""
    return measure(image, mask, pixel_mm).columns


PICTURE_PIXELS = 16_384  # colours and borders are read from a copy at most this large: plenty for shares


def picture_of(image) -> np.ndarray:
    """(h,w,3) uint8 of a PIL image or an array (often already a reduced decode), reduced past PICTURE_PIXELS."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        if image.shape[0] * image.shape[1] <= PICTURE_PIXELS:
            return image
        image = Image.fromarray(image)
    factor = math.ceil(math.sqrt(image.width * image.height / PICTURE_PIXELS))
    if factor > 1:
        image = image.reduce(factor)
    return np.asarray(image.convert("RGB") if image.mode != "RGB" else image)
