"""The best a model working at N px can score at the stored resolution: its training masks themselves.

Each test mask is resized to N px exactly as training resizes it (`data.resize_mask`: bilinear, then >= 0.5),
then scored as a prediction by `lesionseg evaluate --source-resolution`'s own code (upsampled, thresholded,
against the stored mask). The gap to 1.0 is what the input size alone costs the mean per-image Jaccard, before
any model error. "soft" keeps the resized mask's fractions at the lesion border instead of thresholding them
at N px (`--soft-masks`' targets): the most a model that predicts those fractions could recover.

    .venv/bin/python benchmarks/resolution_ceiling.py --data ../shared/data/isic2016-256 --sizes 96 128 192 256 \
        --out benchmarks/results/resolution_ceiling/resolution-ceiling.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import write_result
from lesionseg.segment.pipeline import Pipeline
from lesionseg.train.data import load_split
from lesionseg.train.evaluation import score_source_resolution


class StoredMasks:
    """The masks themselves in the place of a model's probabilities, so they are scored as predictions are."""

    threshold, name, version = 0.5, "stored masks", "-"

    def __init__(self, size: int) -> None:
        self.image_size = size


def ceiling(data: str, split: str, size: int) -> dict[str, float]:
    """Mean and worst-decile per-image Jaccard of the split's own masks, resized to `size` and back."""
    cached = load_split(data, split, size)
    row: dict[str, float] = {"size": size, "images": len(cached)}
    soft = load_split(data, split, size, soft=True, quiet=True)
    for kind, masks in (("binary", cached.masks.float()), ("soft", soft.masks.float())):
        pipeline = Pipeline(StoredMasks(size))
        scores = score_source_resolution(pipeline, masks.numpy(), data, split, cached.ids).compute()
        row |= {
            f"{kind}_iou_per_image": scores["iou_per_image"],
            f"{kind}_iou_worst_decile": scores["iou_worst_decile"],
        }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", choices=("train", "test"), default="test")
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 128, 192, 256])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = [ceiling(args.data, args.split, size) for size in args.sizes]
    for row in rows:
        print(
            f"{row['size']:>4} px, {row['images']} images: mean per-image Jaccard {row['binary_iou_per_image']:.4f} "
            f"(worst decile {row['binary_iou_worst_decile']:.4f}), soft {row['soft_iou_per_image']:.4f} "
            f"({row['soft_iou_worst_decile']:.4f})"
        )
    if args.out:
        write_result(args.out, {"data": args.data, "split": args.split, "rows": rows})


if __name__ == "__main__":
    main()
