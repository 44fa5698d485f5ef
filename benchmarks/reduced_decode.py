"""Does decoding JPEGs reduced (as `lesionseg serve` does) change the masks? Each test image is enlarged to a
camera-like size and saved as JPEG; then it is segmented twice, decoded whole and decoded at the smallest
JPEG scale that keeps the model's size, and both masks are scored against the truth at the stored resolution.

    .venv/bin/python benchmarks/reduced_decode.py --onnx runs/paper-model2.onnx \
        --data ../shared/data/isic2016-256 --out benchmarks/results/reduced_decode/reduced-decode.json
"""

from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np
from PIL import Image

from common import jaccard, write_result
from lesionseg.images import decode_image, decode_reduced, inspect_mask
from lesionseg.segment.pipeline import Pipeline
from lesionseg.segment.predictors import OnnxPredictor
from lesionseg.train.data import find_pairs
from lesionseg.train.metrics import paired_difference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--scale", type=float, default=5.0, help="enlargement: 256 px images become about 1280 px")
    parser.add_argument("--limit", type=int, default=0, help="first N test images only (0: all)")
    parser.add_argument("--out")
    args = parser.parse_args()
    pipeline = Pipeline(OnnxPredictor(args.onnx))
    pairs = find_pairs(args.data, "test")[0][: args.limit or None]
    whole, reduced, seconds = {}, {}, {"whole": 0.0, "reduced": 0.0}
    for pair in pairs:
        image_path, mask_path = pair.image, pair.mask
        truth = inspect_mask(mask_path)[0]
        original = decode_image(image_path, str(image_path))[0]
        big = original.resize(
            (round(original.width * args.scale), round(original.height * args.scale)), Image.Resampling.BICUBIC
        )
        buffer = io.BytesIO()
        big.save(buffer, "JPEG", quality=90)
        start = time.perf_counter()
        full = decode_image(io.BytesIO(buffer.getvalue()), image_path.name)[0]
        seconds["whole"] += time.perf_counter() - start
        start = time.perf_counter()
        small, size = decode_reduced(io.BytesIO(buffer.getvalue()), image_path.name, pipeline.image_size)
        seconds["reduced"] += time.perf_counter() - start
        target = [(truth.shape[1], truth.shape[0])]
        whole[image_path.stem] = jaccard(pipeline.segment([full], sizes=target)[0].mask, truth)
        reduced[image_path.stem] = jaccard(pipeline.segment([small], sizes=target)[0].mask, truth)
    result = {
        "onnx": args.onnx,
        "images": len(pairs),
        "enlarged_to": f"{big.width}x{big.height} JPEG q90 (last image)",
        "jaccard_whole_decode": float(np.mean(list(whole.values()))),
        "jaccard_reduced_decode": float(np.mean(list(reduced.values()))),
        "reduced_minus_whole": paired_difference(reduced, whole),
        "decode_seconds_per_image": {k: v / len(pairs) for k, v in seconds.items()},
    }
    print(json.dumps(result, indent=1))
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    main()
