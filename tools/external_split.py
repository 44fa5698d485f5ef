"""The external validation set: a fixed, lesion-grouped draw of HAM10000 images that no training run sees.

HAM10000 comes from other clinics, devices and annotators than ISIC 2016/2018, so a model chosen on it is chosen
for images unlike its training data, the situation of a user with their own collection. One file, committed,
says which images: `tools/splits/ham10000-external.json` (drawn once by `draw`; the same for every run). `link`
turns it into two folders of symbolic links that every lesionseg command reads as they are:

    .venv/bin/python tools/external_split.py link --ham ../shared/data/ham10000-200 --out runs/ham10000-split
    # runs/ham10000-split/external/test/{images,masks}: the external validation set
    #     lesionseg evaluate --onnx MODEL --data runs/ham10000-split/external
    # runs/ham10000-split/train/{images,masks}: the rest of HAM10000, for training
    #     lesionseg train ... --extra-data runs/ham10000-split/train

    .venv/bin/python tools/external_split.py draw --ham ../shared/data/ham10000-200   # once: rewrites the file

Every image of one lesion (several photographs can show it) falls on the same side.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
from pathlib import Path

SPLIT = Path(__file__).resolve().parent / "splits" / "ham10000-external.json"
SEED = 2025
MIN_IMAGES = 1000


def lesions_of(metadata: Path) -> dict[str, list[str]]:
    """lesion_id -> its image ids, from HAM10000's metadata.csv."""
    lesions: dict[str, list[str]] = {}
    with open(metadata, newline="") as table:
        for row in csv.DictReader(table):
            lesions.setdefault(row["lesion_id"], []).append(row["image_id"])
    return lesions


def draw(lesions: dict[str, list[str]], seed: int = SEED, min_images: int = MIN_IMAGES) -> list[str]:
    """Whole lesions in a seeded order until at least `min_images` images: the external image ids, sorted."""
    order = sorted(lesions)
    random.Random(seed).shuffle(order)
    chosen: list[str] = []
    for lesion in order:
        if len(chosen) >= min_images:
            break
        chosen += lesions[lesion]
    return sorted(chosen)


def link(ham: Path, out: Path, external: set[str]) -> dict[str, int]:
    """Symbolic links to HAM10000's images and masks: external ids under out/external/test, the rest under
    out/train. Links already there are kept; anything else in the way is refused."""
    counts = {"external": 0, "train": 0}
    for image in sorted((ham / "images").iterdir()):
        side = "external" if image.stem in external else "train"
        folder = out / "external" / "test" if side == "external" else out / "train"
        for kind, source in (("images", image), ("masks", ham / "masks" / f"{image.stem}.png")):
            if not source.is_file():
                sys.exit(f"{source}: missing (HAM10000 pairs are images/ISIC_x.jpg with masks/ISIC_x.png)")
            target = folder / kind / source.name
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_symlink() and Path(os.readlink(target)) == source.resolve():
                continue
            if target.exists() or target.is_symlink():
                sys.exit(f"{target}: already there and not a link to {source}; choose another --out")
            target.symlink_to(source.resolve())
        counts[side] += 1
    missing = external - {p.stem for p in (out / "external" / "test" / "images").iterdir()}
    if missing:
        sys.exit(f"{SPLIT}: {len(missing)} external images are not in {ham / 'images'} (e.g. {min(missing)})")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("draw", "link"))
    parser.add_argument("--ham", type=Path, required=True, help="the HAM10000 folder (images/, masks/, metadata.csv)")
    parser.add_argument("--out", type=Path, default=Path("runs/ham10000-split"), help="where `link` makes its folders")
    args = parser.parse_args()
    if args.action == "draw":
        lesions = lesions_of(args.ham / "metadata.csv")
        ids = draw(lesions)
        chosen = set(ids)
        record = {
            "what": "HAM10000 external validation images: whole lesions, seeded draw; no training run sees them",
            "seed": SEED,
            "min_images": MIN_IMAGES,
            "lesions": sum(1 for images in lesions.values() if chosen.issuperset(images)),
            "ids": ids,
        }
        SPLIT.parent.mkdir(exist_ok=True)
        SPLIT.write_text(json.dumps(record, indent=0) + "\n")
        print(f"{SPLIT}: {len(ids)} images of {record['lesions']} lesions")
    else:
        external = set(json.loads(SPLIT.read_text())["ids"])
        counts = link(args.ham, args.out, external)
        print(f"{args.out}: {counts['external']} external validation images, {counts['train']} for training")


if __name__ == "__main__":
    main()
