"""One process against two (torchrun, gloo) at the same global batch and seed, on the CPU.

    .venv/bin/python benchmarks/distributed.py --data ../shared/data/isic2016-256 --epochs 20 --schedule cosine

Prints and saves (benchmarks/results/distributed/distributed-<epochs>ep-<schedule>.json) the final validation IoU of each, the
difference, and training throughput. Two processes on two cores share the same cores, so no
speed-up is expected here; the point is that the result is the same.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import default_out, write_result


def train(processes: int, args, out: Path) -> dict:
    command = [
        "-m",
        "lesionseg",
        "train",
        "--preset",
        "model2-finetune",
        "--data",
        args.data,
        "--out",
        str(out),
        "--epochs",
        str(args.epochs),
        "--schedule",
        args.schedule,
        "--no-pretrained",
        "--device",
        "cpu",
        "--no-progress",
        "--overwrite",  # a benchmark retrains on purpose
    ]
    env = dict(os.environ)
    if processes > 1:
        command = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), *command]
        env["OMP_NUM_THREADS"] = str(max(1, os.cpu_count() // processes))
    start = time.perf_counter()
    subprocess.run([sys.executable, *command], env=env, check=True)
    seconds = time.perf_counter() - start
    log = list(csv.DictReader(open(out / "log.csv")))
    return {
        "processes": processes,
        "wall_seconds": seconds,
        "final_val_iou": float(log[-1]["val_iou"]),
        "final_train_loss": float(log[-1]["train_loss"]),
        "train_images_per_s": sum(float(r["train_images_per_s"]) for r in log) / len(log),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument(
        "--schedule",
        default="constant",
        choices=("constant", "cosine"),
        help="cosine lets the last epochs settle, so the end points can be compared",
    )
    parser.add_argument("--out", default="runs/distributed")
    args = parser.parse_args()
    runs = [train(n, args, Path(args.out) / f"{n}proc") for n in (1, 2)]
    result = {
        "epochs": args.epochs,
        "schedule": args.schedule,
        "runs": runs,
        "val_iou_difference": abs(runs[0]["final_val_iou"] - runs[1]["final_val_iou"]),
    }
    Path("benchmarks/results").mkdir(parents=True, exist_ok=True)
    write_result(default_out(f"distributed-{args.epochs}ep-{args.schedule}"), result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
