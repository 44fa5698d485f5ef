"""Train named variants of one run one after the other and score each on the test split.

Each variant is `lesionseg train` with the common arguments plus its own; the best checkpoint is picked by
validation (never the test split). Reported per variant: best validation IoU (what a choice may rest on),
test Jaccard at the stored resolution, plain and with TTA + largest component + hole filling, the worst
decile, training seconds, and the paired bootstrap interval of the per-image gap to the first variant.
A rerun resumes unfinished variants and rescores finished ones.

    .venv/bin/python benchmarks/variants.py --out runs/finetune-choices \
        --common "--preset unet-finetune --data ../shared/data/isic2016-256 --epochs 6 \
                  --weights ../shared/weights/mobilenet_v2_imagenet_from_keras_int8.pth" \
        --variant base= --variant freeze-bn=--freeze-bn --variant "encoder-lr-0.1=--encoder-lr-scale 0.1"
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

from common import best_validation, epoch_seconds, write_result
from lesionseg.machine import device_name
from lesionseg.train.evaluation import Refinements, evaluate_checkpoint
from lesionseg.train.metrics import paired_difference
from lesionseg.train.rundir import RunDir

BEST = Refinements(tta=True, largest_component=True, fill_holes=True)


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, args = text.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=ARGS")
    return name, shlex.split(args)


def train(out: Path, name: str, common: list[str], extra: list[str]) -> None:
    """Train the variant, or continue it if an earlier run of this script left it unfinished."""
    run = out / name
    command = [sys.executable, "-m", "lesionseg", "train", "--no-progress"]
    command += ["--resume", str(run)] if (run / "config.yaml").is_file() else [*common, *extra, "--out", str(run)]
    with open(out / f"{name}.log", "a") as log:
        if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
            sys.exit(f"training {name} failed; see {out / (name + '.log')}")


def score(run: Path) -> dict[str, object]:
    """Test Jaccard of the best checkpoint at the stored resolution, plain and refined, with per-image values."""
    result = {}
    for refine, where in ((Refinements(), "eval"), (BEST, f"eval-{BEST.name}")):
        scored = evaluate_checkpoint(
            run / "best.pt", split="test", out=run / where, refine=refine, source_resolution=True, progress=False
        )
        metrics = scored["metrics_source_resolution"]
        result[refine.name] = {
            "iou_per_image": metrics["iou_per_image"],
            "iou_worst_decile": metrics["iou_worst_decile"],
            "per_image": {row["id"]: row["iou_source"] for row in scored["per_image"]},
        }
    return result


def table(summary: dict[str, dict]) -> str:
    lines = [
        "| variant | best val IoU (epoch) | test Jaccard | + TTA, largest comp., fill holes | worst decile "
        "| train s | − first variant, 95 % interval |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, v in summary.items():
        gap = v.get("vs_first")
        gap_text = f"{gap['mean']:+.4f} ({gap['ci95_low']:+.4f} to {gap['ci95_high']:+.4f})" if gap else "–"
        lines.append(
            f"| {name} | {v['val_iou']:.4f} ({v['best_epoch']}/{v['epochs_run']}) | {v['plain']:.4f} | "
            f"{v['best']:.4f} | {v['worst_decile']:.4f} | {v['train_seconds']:.0f} | {gap_text} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--common", default="", help="arguments every variant's `lesionseg train` gets")
    parser.add_argument("--variant", action="append", type=parse_variant, required=True, help="NAME=ARGS, repeatable")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    summary, first = {}, None
    for name, extra in args.variant:
        train(args.out, name, shlex.split(args.common), extra)
        run = args.out / name
        scores = score(run)
        plain = scores["plain"]["per_image"]
        summary[name] = {
            **best_validation(run),
            "args": extra,
            "train_seconds": epoch_seconds(run),
            "plain": scores["plain"]["iou_per_image"],
            "best": scores[BEST.name]["iou_per_image"],
            "worst_decile": scores["plain"]["iou_worst_decile"],
            "weights": RunDir(run).read_info().get("weights"),
        }
        if first is None:
            first = plain
        else:
            summary[name]["vs_first"] = paired_difference(plain, first)
        print(table(summary), flush=True)
    result = {
        "device": device_name(),
        "common": args.common,
        "wall_seconds": time.perf_counter() - start,
        "variants": summary,
    }
    write_result(args.out / "variants.json", result)
    (args.out / "variants.md").write_text(f"{device_name()}\n\n`{args.common}`\n\n{table(summary)}\n")
    print(f"written: {args.out / 'variants.md'}")


if __name__ == "__main__":
    main()
