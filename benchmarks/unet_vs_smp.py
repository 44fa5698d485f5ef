"""Our U-Net against smp's Unet("mobilenet_v2"): same data, loss, schedule, epochs, seed.

Trains both with the `unet-finetune` preset (overridable), scores each best checkpoint (picked by
validation IoU, never the test split) on the test split, plain and with each inference refinement,
and reports the ratio ours / smp of mean per-image Jaccard.

    .venv/bin/python benchmarks/unet_vs_smp.py --data ../shared/data/isic2016-256 --out runs/unet-vs-smp \
        --epochs 30 --no-pretrained
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lesionseg.config import build_config
from lesionseg.evaluation import Refinements, evaluate_checkpoint
from lesionseg.reproduce import run_compare
from lesionseg.training import fit

REFINEMENTS = (Refinements(), Refinements(tta=True), Refinements(largest_component=True, fill_holes=True),
               Refinements(tta=True, largest_component=True, fill_holes=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", default="runs/unet-vs-smp")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--no-pretrained", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    results = {}
    for arch in ("unet", "smp-unet"):
        config = build_config("unet-finetune", arch=arch, data=args.data, out=str(out / arch), epochs=args.epochs,
                              image_size=args.image_size, weights="none" if args.no_pretrained else "imagenet")
        start = time.perf_counter()
        fit(config)
        seconds = time.perf_counter() - start
        scores = {}
        for refine in REFINEMENTS:
            where = out / arch / ("eval" if refine == Refinements() else f"eval-{refine.name}")
            metrics = evaluate_checkpoint(out / arch / "best.pt", split="test", out=where, refine=refine, progress=False)["metrics"]
            scores[refine.name] = {k: metrics[k] for k in ("iou_per_image", "dice_per_image", "thresholded_iou_per_image",
                                                          "iou_worst_decile")}
        results[arch] = {"train_seconds": seconds, "epochs": args.epochs, "scores": scores}
    ratio = results["unet"]["scores"]["plain"]["iou_per_image"] / results["smp-unet"]["scores"]["plain"]["iou_per_image"]
    summary = {"config": build_config("unet-finetune", epochs=args.epochs, image_size=args.image_size).to_dict(),
               "results": results, "iou_ratio_ours_over_smp": ratio}
    (out / "unet_vs_smp.json").write_text(json.dumps(summary, indent=2))
    run_compare([out / "unet", out / "smp-unet"], out / "compare", progress=False)
    for arch, r in results.items():
        for name, s in r["scores"].items():
            print(f"{arch:9s} {name:45s} IoU {s['iou_per_image']:.4f}  Dice {s['dice_per_image']:.4f}  "
                  f"thresholded {s['thresholded_iou_per_image']:.4f}  worst decile {s['iou_worst_decile']:.4f}")
    print(f"ratio ours/smp (plain mean per-image Jaccard): {ratio:.4f}")


if __name__ == "__main__":
    main()
