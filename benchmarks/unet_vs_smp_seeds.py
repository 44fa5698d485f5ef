"""Ours against smp over several seeds: combines finished `unet_vs_smp.py` runs that differ only in --seed.

One seed cannot tell a 0.002 gap from the luck of one initialisation. This reads each run folder's
unet_vs_smp.json and per-image scores and reports, per refinement at the stored resolution: each seed's
mean per-image Jaccard, the mean and spread over seeds, the ratio ours / smp of the seed means, and the
paired bootstrap interval of the difference of seed-averaged per-image Jaccard (the same test images).

    .venv/bin/python benchmarks/unet_vs_smp_seeds.py runs/unet-vs-smp-extra runs/unet-vs-smp-extra-seed1 \
        --out benchmarks/results/unet_vs_smp_seeds/unet_vs_smp-extra-16ep-128px-seeds.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from common import read_result, write_result
from lesionseg.train.metrics import paired_difference
from unet_vs_smp import ARCHS, REFINEMENTS, per_image_jaccard

SAME = ("data", "extra_data", "epochs", "image_size", "loss", "schedule", "decoder_attention", "weights")


def load_runs(folders: list[Path]) -> list[dict]:
    """Each folder's summary; refuses folders that are not the same experiment with another seed."""
    summaries = []
    for folder in folders:
        path = folder / "unet_vs_smp.json"
        if not path.is_file():
            sys.exit(f"{path}: not found; run benchmarks/unet_vs_smp.py --out {folder} first")
        summaries.append({**read_result(path), "folder": folder})
    first = summaries[0]["config"]
    for summary in summaries[1:]:
        differing = [key for key in SAME if summary["config"][key] != first[key]]
        if differing:
            sys.exit(
                f"{summary['folder']}: differs from {summaries[0]['folder']} in {', '.join(differing)}, not only the seed"
            )
    seeds = [s["config"]["seed"] for s in summaries]
    if len(set(seeds)) != len(seeds):
        sys.exit(f"the same seed appears twice: {seeds}")
    return summaries


def seed_averaged(folders: list[Path], arch: str, refinement: str) -> dict[str, float]:
    """Per-image Jaccard averaged over seeds."""
    scores = [per_image_jaccard(folder / arch, refinement) for folder in folders]
    return {image: float(np.mean([s[image] for s in scores])) for image in scores[0]}


def combine(summaries: list[dict]) -> dict:
    folders = [s["folder"] for s in summaries]
    table = {}
    for refinement in (r.name for r in REFINEMENTS):
        per_seed = {
            arch: [s["results"][arch]["scores"][refinement]["stored"]["iou_per_image"] for s in summaries]
            for arch in ARCHS
        }
        table[refinement] = {
            "per_seed": per_seed,
            "mean": {arch: float(np.mean(v)) for arch, v in per_seed.items()},
            "sd": {arch: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for arch, v in per_seed.items()},
            "ratio_ours_over_smp": float(np.mean(per_seed["unet"]) / np.mean(per_seed["smp-unet"])),
            "paired_difference_seed_averaged": paired_difference(
                seed_averaged(folders, "unet", refinement), seed_averaged(folders, "smp-unet", refinement)
            ),
        }
    return {
        "seeds": [s["config"]["seed"] for s in summaries],
        "runs": [str(f) for f in folders],
        "commands": [s["command"] for s in summaries],
        "device": summaries[0]["device"],
        "wall_seconds": [s["wall_seconds"] for s in summaries],
        "train_seconds": {arch: [s["results"][arch]["train_seconds"] for s in summaries] for arch in ARCHS},
        "stored_resolution_jaccard": table,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="unet_vs_smp.py --out folders, one per seed")
    parser.add_argument("--out", type=Path, help="write the combined JSON here")
    args = parser.parse_args()
    combined = combine(load_runs(args.runs))
    if args.out:
        write_result(args.out, combined)
    print(f"seeds {combined['seeds']} — mean per-image Jaccard at the stored resolution")
    for refinement, row in combined["stored_resolution_jaccard"].items():
        d = row["paired_difference_seed_averaged"]
        print(
            f"{refinement:34s} ours {row['mean']['unet']:.4f} ± {row['sd']['unet']:.4f}  "
            f"smp {row['mean']['smp-unet']:.4f} ± {row['sd']['smp-unet']:.4f}  ratio {row['ratio_ours_over_smp']:.4f}  "
            f"ours - smp {d['mean']:+.4f} [{d['ci95_low']:+.4f}, {d['ci95_high']:+.4f}]"
        )


if __name__ == "__main__":
    main()
