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
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from common import write_result
from lesionseg.api import load
from lesionseg.files import sha256_of
from lesionseg.images import inspect_mask, is_image_file
from lesionseg.segment.clicks import Clicker, click_model_path, next_click
from lesionseg.segment.pipeline import FIXED_POINT, model_input, read_for_model, to_own_size

MAX_CLICKS = 20


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


def one_image(segmenter, clicker: Clicker, image: Path, truth: np.ndarray, start: str) -> dict:
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
        probability = clicker.corrected(pixels, own, positive, negative, current)
        current = to_own_size(probability, *own) >= clicker.model.threshold * FIXED_POINT
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
    parser.add_argument("--out")
    args = parser.parse_args()
    segmenter, clicker = load(), Clicker(args.model)
    runs = []
    for image, mask in pairs(args.images, args.masks, args.skip, args.limit):
        truth, _ = inspect_mask(mask, allow_empty=True)
        runs.append({"image": image.name} | one_image(segmenter, clicker, image, truth, args.start))
    model = {"path": str(clicker.path or click_model_path()), "sha256": sha256_of(clicker.path or click_model_path())}
    model["version"] = clicker.model.version  # the file that answered: its training step
    result = {"start": args.start, "pairs": {"skip": args.skip, "limit": args.limit}}
    result |= {"model": model, "summary": summary(runs), "runs": runs}
    print(result["summary"])
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    main()
