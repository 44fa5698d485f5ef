"""The six dermoscopic colours of a lesion, read the way a dermatologist reads them: relative to the patient's own
skin around it, with what is not the lesion's colour left out.

Why each rule (docs/descriptors.md has what was measured):
- The skin is the reference. Melanin shallow in the epidermis looks light brown, deeper dark brown, in the stratum
  corneum black, in the dermis blue-gray (the Tyndall effect); blood is red; regression and scarring are white, that
  is *lighter than the skin around*. A pale lesion on pale skin and a brown one on brown skin differ by how far
  they depart from their skin, not by their absolute colour: so each pixel is read as its lightness step from the
  skin (ΔL*) and its own chroma and hue. The skin is the median colour of a band outside the outline, leaving a
  gap for the outline's own uncertainty; where no skin is seen, a typical light skin stands in.
- Not colours of the lesion: specular reflections and air bubbles (near-white, lighter than anything else),
  hair (thin dark lines, found by a black top-hat and kept only where elongated: a dot or globule is round) and
  the dermoscope's dark vignette (dark regions connected to the picture's edge that lie mostly outside the
  lesion). They are masked out of the lesion and of the skin band.
- A colour is present when it covers at least its share of the lesion's readable pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

COLOURS = ("white", "red", "light_brown", "dark_brown", "blue_gray", "black")
NONE = len(COLOURS)  # a lesion pixel of none of the six: too close to the skin to call
IGNORED = NONE + 1  # reflection, bubble, hair or vignette
OUTSIDE = 255  # not the lesion

WHITE_LIFT = 6.0  # ΔL* above the skin: white (regression, scar) is lighter than the skin around it
SKIN_LIKE = 8.0  # |ΔL*| below this (and no red, no blue): reads as skin, none of the six
DARK_BROWN_DROP = 35.0  # ΔL* below -this: dark brown rather than light brown
BLACK_L = 28.0  # absolute L* below this and low chroma: black (pigment in the stratum corneum looks black on any skin)
BLACK_CHROMA = 18.0
RED_HUE = (-30.0, 25.0)  # degrees of CIELAB hue (a*, b*) that read as red rather than brown (adapted nevi: 28-57)
RED_CHROMA = 25.0  # and at least this chroma: blood, not a pinker patch of skin (adapted skin: 22)
BLUE_DROP = 10.0  # b* this far below the skin's (toward blue), or chroma near zero: blue-gray, not brown
GREY_CHROMA = 8.0
REFLECTION_L = 92.0  # L* at or above (and REFLECTION_LIFT above the skin): a reflection or a bubble's rim, not white
REFLECTION_LIFT = 5.0
VIGNETTE_L = 18.0
HAIR_DEPTH = 12.0  # L* a hair is darker than its 7-pixel neighbourhood
HAIR_ELONGATION = 3.0  # length over width of a dark thin component for it to be hair
HAIR_OUTSIDE = 0.2  # and this share of it on the skin outside the lesion
PRESENT_SHARE = {
    "white": 0.04,
    "red": 0.04,
    "light_brown": 0.075,
    "dark_brown": 0.075,
    "blue_gray": 0.075,
    "black": 0.02,
}
SKIN_RGB = (222, 178, 155)  # light skin under a dermoscope's white light: what every picture's skin is adapted to
MAX_GAIN = 3.0  # per channel: a picture whose "skin" needs more is too dark or too tinted to adapt further

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


def lightness_of(linear: np.ndarray) -> np.ndarray:
    """(..., 3) linear RGB -> CIELAB L* alone (from the luminance Y): what the artefact rules read."""
    y = linear @ RGB_TO_XYZ[:, 1]
    return 116 * np.where(y > (6 / 29) ** 3, np.cbrt(y), y / (3 * (6 / 29) ** 2) + 4 / 29) - 16


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) sRGB 0..255 -> CIELAB."""
    return linear_to_lab(SRGB_TO_LINEAR[np.clip(np.rint(rgb), 0, 255).astype(np.uint8)])


SKIN_LINEAR = SRGB_TO_LINEAR[np.array(SKIN_RGB)]
SKIN_LAB = linear_to_lab(SKIN_LINEAR).astype(np.float32)


@dataclass
class ColourReading:
    """A picture's colours as read against its skin: every lesion pixel's class (COLOURS' index, NONE or IGNORED;
    OUTSIDE elsewhere), the skin's CIELAB and whether it was seen, and the adapted L* for borders and structure."""

    classes: np.ndarray  # (h, w) uint8
    lightness: np.ndarray  # (h, w) float32 L*
    skin: np.ndarray  # (3,) CIELAB of the skin as photographed
    skin_seen: bool  # False: no skin around the lesion, SKIN_RGB stood in

    def shares(self, where: np.ndarray) -> np.ndarray:
        """Share of each of the six colours among the readable pixels of `where` (a bool mask or index)."""
        counts = np.bincount(self.classes[where].ravel(), minlength=IGNORED + 1)
        readable = counts[: NONE + 1].sum()
        return counts[:NONE] / readable if readable else np.zeros(NONE)

    def present(self, shares: np.ndarray) -> list[str]:
        return [name for name, share in zip(COLOURS, shares) if share >= PRESENT_SHARE[name]]


def vignette(lightness: np.ndarray, lesion: np.ndarray) -> np.ndarray:
    """The dermoscope's dark corners: dark regions that touch the picture's edge and lie mostly outside the lesion."""
    dark = lightness < VIGNETTE_L
    if not (dark[0].any() or dark[-1].any() or dark[:, 0].any() or dark[:, -1].any()):  # most pictures: no label
        return np.zeros(lightness.shape, bool)
    labels, count = ndimage.label(dark)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    size = np.bincount(labels.ravel(), minlength=count + 1)
    outside = np.bincount(labels.ravel(), weights=~lesion.ravel(), minlength=count + 1)
    keep = np.zeros(count + 1, bool)
    keep[edge] = True
    keep &= outside >= 0.5 * np.maximum(size, 1)
    keep[0] = False
    return keep[labels]


def reflections(lightness: np.ndarray, skin_lightness: float) -> np.ndarray:
    """Specular reflections and air bubbles' rims: brighter than REFLECTION_L and clearly brighter than the skin
    (on very pale skin the skin itself passes REFLECTION_L), with their one-pixel halo."""
    return grown(lightness >= max(REFLECTION_L, skin_lightness + REFLECTION_LIFT))


def hair(lightness: np.ndarray, lesion: np.ndarray) -> np.ndarray:
    """Thin dark lines: a black top-hat (closing minus the picture) deeper than HAIR_DEPTH, kept where the
    component is elongated and runs on past the lesion onto the skin (a hair is long; a thin dark streak or a
    sliver of pigment that stays inside the lesion is the lesion's own, as are round dots and globules)."""
    tophat = square_extreme(square_extreme(lightness, 7, np.maximum), 7, np.minimum) - lightness
    labels, count = ndimage.label(tophat > HAIR_DEPTH, structure=np.ones((3, 3)))  # diagonal hairs hold together
    if not count:
        return np.zeros(lightness.shape, bool)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    outside = np.bincount(labels.ravel(), weights=~lesion.ravel(), minlength=count + 1)[1:]
    length = np.array([max(r.stop - r.start, c.stop - c.start) for r, c in ndimage.find_objects(labels)])
    thin = (sizes >= 4) & (length * length / sizes >= HAIR_ELONGATION)  # length over mean width
    keep = np.concatenate([[False], thin & (outside >= HAIR_OUTSIDE * sizes)])
    return grown(keep[labels])


def square_extreme(values: np.ndarray, size: int, extreme: np.ufunc) -> np.ndarray:
    """np.maximum or np.minimum over a size x size square, edges mirrored: ndimage.grey_dilation/grey_erosion's
    result (tested equal) in half their time on a 128 px picture, one vectorized pass per shift and axis."""
    reach = size // 2
    for axis in (0, 1):
        padded = np.moveaxis(
            np.pad(values, [(reach, reach) if a == axis else (0, 0) for a in (0, 1)], "symmetric"), axis, 0
        )
        length = padded.shape[0] - 2 * reach
        result = padded[:length].copy()
        for shift in range(1, size):
            extreme(result, padded[shift : shift + length], out=result)
        values = np.moveaxis(result, 0, axis)
    return values


def grown(mask: np.ndarray) -> np.ndarray:
    """The mask and its 4-connected one-pixel halo (ndimage.binary_dilation's default), skipped where empty: most
    pictures have no reflection and no hair."""
    if not mask.any():
        return mask
    return ndimage.maximum_filter(mask, footprint=ndimage.generate_binary_structure(2, 1), mode="constant")


def skin_band(outside: np.ndarray) -> np.ndarray:
    """A band outside the outline, from its (h,w) city-block distance to the lesion (0 inside): from a twentieth to
    a quarter of the lesion's equivalent radius away (at least 1 and 3 pixels), near enough to be the same skin,
    far enough to leave the outline's uncertainty."""
    radius = np.sqrt(np.count_nonzero(outside == 0) / np.pi)
    gap, width = max(1, round(radius * 0.05)), max(3, round(radius * 0.25))
    return (outside > gap) & (outside <= gap + width)


def distance_outside(lesion: np.ndarray) -> np.ndarray:
    """City-block distance of every pixel to the lesion (0 inside): each band around the outline is one compare."""
    return ndimage.distance_transform_cdt(~lesion, metric="taxicab")


def classify(lab: np.ndarray, skin: np.ndarray) -> np.ndarray:
    """Each pixel's colour class (index into COLOURS, or NONE) from its CIELAB relative to the skin's."""
    lightness, a, b = lab[..., 0], lab[..., 1], lab[..., 2]
    step = lightness - skin[0]
    chroma = np.hypot(a, b)
    classes = np.full(lightness.shape, NONE, np.uint8)
    darker = step <= -SKIN_LIKE
    bluish = (b - skin[2] <= -BLUE_DROP) | (chroma < GREY_CHROMA)
    classes[darker & ~bluish] = COLOURS.index("light_brown")
    classes[(step <= -DARK_BROWN_DROP) & ~bluish] = COLOURS.index("dark_brown")
    classes[darker & bluish] = COLOURS.index("blue_gray")
    low, high = np.tan(np.radians(RED_HUE))  # the hue's bounds as slopes b*/a* (0 red, 90 yellow): no arctan per pixel
    red = (a > 0) & (b >= low * a) & (b < high * a) & (chroma >= RED_CHROMA)
    classes[red & (step > -DARK_BROWN_DROP)] = COLOURS.index("red")
    classes[step >= WHITE_LIFT] = COLOURS.index("white")
    classes[(lightness < BLACK_L) & (chroma < BLACK_CHROMA)] = COLOURS.index("black")
    return classes


def read_colours(picture: np.ndarray, lesion: np.ndarray, outside: np.ndarray | None = None) -> ColourReading:
    """(h,w,3) uint8 RGB picture and its (h,w) bool lesion mask -> every pixel's colour class against the skin.
    `outside`: distance_outside(lesion), where the caller has it. The picture is first adapted (von Kries, on linear RGB) so that its skin looks like SKIN_RGB: as the eye adapts
    to the field it sees, mostly skin, a pink camera cast and a patient's own skin tone are taken out together."""
    linear = SRGB_TO_LINEAR[picture]
    lightness = lightness_of(linear)
    ignored = vignette(lightness, lesion) | hair(lightness, lesion)
    band = skin_band(distance_outside(lesion) if outside is None else outside) & ~ignored
    skin_seen = int(band.sum()) >= 10
    skin = np.median(linear[band], axis=0) if skin_seen else SKIN_LINEAR  # a median: a reflection or two is not skin
    ignored |= reflections(lightness, float(linear_to_lab(skin)[0]))
    gain = np.clip(SKIN_LINEAR / np.maximum(skin, 1e-4), 1 / MAX_GAIN, MAX_GAIN).astype(np.float32)
    adapted = np.minimum(linear * gain, 1.0)
    classes = np.full(lesion.shape, OUTSIDE, np.uint8)  # only the lesion's pixels are read as colours
    classes[lesion] = np.where(ignored[lesion], IGNORED, classify(linear_to_lab(adapted[lesion]), SKIN_LAB))
    return ColourReading(classes, lightness_of(adapted), linear_to_lab(skin).astype(np.float32), skin_seen)
