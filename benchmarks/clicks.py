"""How many clicks a mask needs: the standard interactive-segmentation protocol on any folder of image/mask pairs.

RITM's protocol (Sofiiuk et al. 2022; f-BRS, CVAT's interactors): the next click goes to the point of the larger
error region (missed lesion or extra) farthest from its border, positive on a miss, negative on an extra, at most
MAX_CLICKS; NoC@85 and NoC@90 are the clicks needed to reach that Jaccard (an image never reaching it counts
MAX_CLICKS and is reported as unreached). Starting from the released model's mask (an image already there needs 0
clicks) or from nothing. Everything at the image's own size; each click's mask is what the review page would show
(the click model's answer, thresholded, at the own size), its server time measured around that work.

    .venv/bin/python benchmarks/clicks.py --images runs/ham10000-split/external/test/images \
        --masks runs/ham10000-split/external/test/masks --model runs/clicks/clicks.onnx --start release \
        --out benchmarks/results/clicks/external-release.json

`--skip N --limit M` takes pairs N to N+M-1 (the external split's first 200 report; images from 200 on choose),
`--variant` answers a click another way than the package does (experiments, docs/adapt.md "Clicks").
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from common import write_result
from lesionseg.api import load
from lesionseg.files import sha256_of
from lesionseg.images import inspect_mask, is_image_file
from lesionseg.segment.clicks import Clicker, ClickModel, click_maps, click_model_path, next_click, previous_mask
from lesionseg.segment.pipeline import FIXED_POINT, model_input, read_for_model, to_own_size

MAX_CLICKS = 20
# how a click is answered: as the package does ("shipped"), or as an inference-time experiment
VARIANTS = ("shipped", "local", "flip", "twice", "zoom")


def local(answer: np.ndarray, guide: np.ndarray, threshold: float) -> np.ndarray:
    """FocalClick's progressive merge (Chen et al. 2022): the answer's changes to the previous mask only in the
    changed regions a click touches, the previous mask elsewhere."""
    changed = (answer >= threshold) != (guide[2] >= 0.5)
    labels, count = ndimage.label(changed, structure=np.ones((3, 3), bool))
    if not count:
        return answer
    touched = np.isin(labels, np.unique(labels[((guide[0] > 0) | (guide[1] > 0)) & changed]))
    return np.where(changed & ~touched, guide[2], answer).astype(np.float32)


class Variant:
    """The click model answering as an inference-time experiment says: "local" (FocalClick's merge), "flip" (the
    mean with the mirrored image's answer), "twice" (the answer fed back once as the previous mask)."""

    def __init__(self, model, variant: str) -> None:
        self.model, self.variant = model, variant
        self.threshold, self.image_size, self.version = model.threshold, model.image_size, model.version

    def __call__(self, pixels: np.ndarray, guide: np.ndarray) -> np.ndarray:
        first = self.model(pixels, guide)
        if self.variant == "local":
            return local(first, guide, self.threshold)
        if self.variant == "flip":
            return (first + self.model(pixels[:, :, ::-1].copy(), guide[:, :, ::-1].copy())[:, ::-1]) / 2
        again = guide.copy()
        again[2] = first >= self.threshold
        return self.model(pixels, again)


ZOOM_EXPAND, ZOOM_MIN = 1.4, 0.2  # RITM's zoom-in: the box around mask and clicks, widened; at least this share


def zoom_box(mask: np.ndarray, points: list) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) in own pixels, the image's aspect: the mask and clicks widened by ZOOM_EXPAND;
    None where that is (nearly) the whole image or there is no mask to zoom on."""
    height, width = mask.shape
    rows, cols = np.nonzero(mask)
    if not len(rows):
        return None
    xs = np.concatenate([cols, [p[0] for p in points]])
    ys = np.concatenate([rows, [p[1] for p in points]])
    half_h = max((ys.max() - ys.min() + 1) * ZOOM_EXPAND, (xs.max() - xs.min() + 1) * ZOOM_EXPAND * height / width,
                 ZOOM_MIN * height) / 2  # fmt: skip
    if half_h * 2 >= 0.9 * height:
        return None
    half_w = half_h * width / height
    cx = min(max((xs.max() + xs.min() + 1) / 2, half_w), width - half_w)
    cy = min(max((ys.max() + ys.min() + 1) / 2, half_h), height - half_h)
    return round(cx - half_w), round(cy - half_h), round(cx + half_w), round(cy + half_h)


def zoomed(clicker: Clicker, picture, own, positive: list, negative: list, mask: np.ndarray) -> np.ndarray | None:
    """The own-size fixed-point probability from the model run on the box around the lesion (RITM's ZoomIn,
    FocalClick's focus): more of the model's pixels on the border. None where no zoom applies."""
    box = zoom_box(mask, positive + negative)
    if box is None:
        return None
    left, top, right, bottom = box
    scale = (picture.width / own[0], picture.height / own[1])
    crop = picture.crop((left * scale[0], top * scale[1], right * scale[0], bottom * scale[1]))
    size, width, height = clicker.image_size, right - left, bottom - top
    shifted = [[(x - left, y - top) for x, y in points] for points in (positive, negative)]
    guide = np.concatenate(
        [click_maps(*shifted, width, height, size), previous_mask(mask[top:bottom, left:right], size)[None]]
    )
    answer = clicker.model(model_input(crop.convert("RGB"), size), guide)
    out = np.where(mask, FIXED_POINT, 0).astype(np.int32)
    out[top:bottom, left:right] = to_own_size(answer, width, height)
    return out


def with_variant(clicker: Clicker, variant: str) -> Clicker:
    """The clicker whose model answers as `variant` says ("shipped": as it is)."""
    if variant not in ("shipped", "zoom"):
        clicker.model = Variant(ClickModel(clicker.path or click_model_path()), variant)
    return clicker


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def pairs(images: Path, masks: Path, skip: int, limit: int | None) -> list[tuple[Path, Path]]:
    found = []
    for image in sorted(p for p in images.iterdir() if is_image_file(p)):
        for name in (f"{image.stem}.png", f"{image.stem}_Segmentation.png"):
            if (masks / name).is_file():
                found.append((image, masks / name))
                break
    return found[skip:][:limit]


def one_image(segmenter, clicker: Clicker, image: Path, truth: np.ndarray, start: str, zoom: bool = False) -> dict:
    """The Jaccard after each click (index 0: the start), and the server's time per click."""
    picture, own, _ = read_for_model(image, str(image), clicker.image_size)
    pixels = model_input(picture, clicker.image_size)
    current = segmenter.segment(str(image)).mask if start == "release" else np.zeros(truth.shape, bool)
    scores, seconds, positive, negative = [jaccard(current, truth)], [], [], []
    for _ in range(MAX_CLICKS):
        found = next_click(current, truth)
        if found is None:
            scores.append(1.0)
            break
        (positive if found[1] else negative).append(found[0])
        began = time.perf_counter()
        fixed = zoomed(clicker, picture, own, positive, negative, current) if zoom else None
        if fixed is None:
            fixed = to_own_size(clicker.corrected(pixels, own, positive, negative, current), *own)
        current = fixed >= clicker.model.threshold * FIXED_POINT
        seconds.append(time.perf_counter() - began)
        scores.append(jaccard(current, truth))
    return {"scores": scores, "seconds": seconds}


def clicks_to(scores: list[float], target: float) -> int | None:
    """Clicks until the Jaccard first reaches `target` (0: the start already does), None if never."""
    return next((n for n, score in enumerate(scores) if score >= target), None)


def summary(runs: list[dict]) -> dict:
    out = {"images": len(runs)}
    for target in (0.85, 0.90):
        needed = [clicks_to(run["scores"], target) for run in runs]
        out[f"noc@{round(target * 100)}"] = float(np.mean([MAX_CLICKS if n is None else n for n in needed]))
        out[f"unreached@{round(target * 100)}"] = float(np.mean([n is None for n in needed]))
    for k in (0, 1, 3, 5):
        out[f"jaccard_after_{k}"] = float(np.mean([run["scores"][min(k, len(run["scores"]) - 1)] for run in runs]))
    times = [s for run in runs for s in run["seconds"]]
    out["server_ms_per_click_median"] = 1000 * statistics.median(times) if times else None
    out["clicks_timed"] = len(times)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--masks", type=Path, required=True)
    parser.add_argument("--model", type=Path, help="the click model (default: the shipped one)")
    parser.add_argument("--start", choices=("release", "empty"), default="release")
    parser.add_argument("--skip", type=int, default=0, help="leave out the first N pairs (held for reporting)")
    parser.add_argument("--limit", type=int, help="the first N pairs only (after --skip)")
    parser.add_argument("--variant", choices=VARIANTS, default="shipped", help="an inference-time experiment")
    parser.add_argument("--out")
    args = parser.parse_args()
    segmenter, clicker = load(), with_variant(Clicker(args.model), args.variant)
    runs = []
    for image, mask in pairs(args.images, args.masks, args.skip, args.limit):
        truth, _ = inspect_mask(mask, allow_empty=True)
        runs.append(
            {"image": image.name} | one_image(segmenter, clicker, image, truth, args.start, args.variant == "zoom")
        )
    model = {"path": str(clicker.path or click_model_path()), "sha256": sha256_of(clicker.path or click_model_path())}
    model["version"] = clicker.model.version  # the file that answered: its training step
    result = {"start": args.start, "variant": args.variant, "pairs": {"skip": args.skip, "limit": args.limit}}
    result |= {"model": model, "summary": summary(runs), "runs": runs}
    print(result["summary"])
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    main()
