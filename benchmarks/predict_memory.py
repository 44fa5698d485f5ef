"""`lesionseg predict` over a large folder: is its memory flat? And 1 process against 2 (`--shard`) on one machine.

Makes N synthetic 765x572 JPEGs (predict_speed.py's camera-like images), runs `lesionseg predict FOLDER --out OUT`
as a child process and reads its resident memory from /proc every half second, with how many masks exist by then.
Reports the peak and the memory at 10 %, 50 % and 90 % of the images: flat means the last is not above the first.
With --shards, the same folder is then segmented by 2 processes under torchrun (each takes its share by RANK /
WORLD_SIZE, with onnxruntime's default threads; the last to finish joins the rows), and its masks and rows are
compared with the single process's.

    .venv/bin/python benchmarks/predict_memory.py --images 5000 --out benchmarks/results/predict_memory/5000.json
"""

from __future__ import annotations

import argparse
import filecmp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import write_result
from predict_speed import synthetic

LESIONSEG = [sys.executable, "-m", "lesionseg"]


def resident_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def watched(command: list[str], masks: Path, env: dict | None = None) -> dict:
    """Run `command`, sampling its resident memory and the masks written so far; the timeline and the wall time."""
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    samples = []
    while child.poll() is None:
        done = sum(1 for _ in os.scandir(masks)) if masks.is_dir() else 0
        samples.append((time.perf_counter() - start, resident_mib(child.pid), done))
        time.sleep(0.5)
    if child.returncode:
        sys.exit(f"{' '.join(command)} failed: {child.stderr.read()[-2000:]}")
    return {"seconds": time.perf_counter() - start, "samples": samples}


def at_share(samples: list, total: int, share: float) -> float:
    """Resident MiB when `share` of the images had their masks."""
    return next((rss for _, rss, done in samples if done >= share * total), samples[-1][1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--shards", action="store_true", help="also 2 processes with --shard, compared with 1")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = synthetic(Path(scratch) / "images", args.images, (765, 572), ".jpg")
        one = Path(scratch) / "one"
        run = watched([*LESIONSEG, "predict", str(folder), "--out", str(one), "--no-progress"], one / "masks")
        samples = run["samples"]
        result = {
            "images": args.images,
            "image_size": [765, 572],
            "seconds": run["seconds"],
            "images_per_s": args.images / run["seconds"],
            "peak_mib": max(rss for _, rss, _ in samples),
            "mib_at": {share: at_share(samples, args.images, share) for share in (0.1, 0.5, 0.9)},
            "timeline": samples[:: max(1, len(samples) // 100)],
        }
        print({k: v for k, v in result.items() if k != "timeline"})
        if args.shards:
            two = Path(scratch) / "two"
            torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "lesionseg"]
            start = time.perf_counter()
            command = [*torchrun, "predict", str(folder), "--out", str(two), "--no-progress"]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            seconds = time.perf_counter() - start
            names = sorted(p.name for p in (one / "masks").iterdir())
            same = filecmp.cmpfiles(one / "masks", two / "masks", names, shallow=False)[0]
            result["two_shards"] = {
                "seconds": seconds,
                "images_per_s": args.images / seconds,
                "vs_one_process": run["seconds"] / seconds,
                "identical_masks": len(same),
                "identical_rows": (one / "predictions.csv").read_bytes() == (two / "predictions.csv").read_bytes(),
            }
            print(result["two_shards"])
    write_result(args.out, result)


if __name__ == "__main__":
    main()
