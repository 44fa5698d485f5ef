"""Peak memory of `lesionseg predict` and of the service on images just under the pixel limit.

16 PNGs of 7745x7745 pixels (1-bit, a few KB each on disk, 60 MP = 180 MB each once decoded to RGB) go through
`lesionseg predict --overlays` (one process, peak RSS from the kernel's accounting), then 12 of them are posted
at once to `lesionseg serve` (peak and settled RSS of the server process, from /proc). Target: under 1.5 GB each.

    .venv/bin/python benchmarks/hostile_memory.py [--model MODEL.onnx] [--images 16] [--uploads 12]
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from common import default_out, write_result

SIDE = 7745  # 7745**2 = 59,985,025 pixels, just under lesionseg.images.MAX_PIXELS


def write_images(folder: Path, count: int) -> list[Path]:
    """1-bit PNGs with a dark disc (a 'lesion') on white: tiny files, full-size decodes."""
    yy, xx = np.ogrid[:SIDE, :SIDE]
    disc = (yy - SIDE / 2) ** 2 + (xx - SIDE / 2) ** 2 > (SIDE / 4) ** 2
    paths = []
    for n in range(count):
        path = folder / f"big{n:02d}.png"
        Image.fromarray(disc).save(path, optimize=True)
        paths.append(path)
    return paths


def peak_of_predict(images: Path, out: Path, model: list[str]) -> dict:
    start = time.perf_counter()
    command = [sys.executable, "-m", "lesionseg", "predict", *model, str(images), "--out", str(out), "--overlays"]
    done = subprocess.run([*command, "--no-progress"], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"peak_rss_mb": round(peak_kb / 1024), "seconds": round(time.perf_counter() - start, 1)}


def rss_mb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return round(int(line.split()[1]) / 1024)
    raise KeyError(key)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def peak_of_service(paths: list[Path], model: list[str]) -> dict:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "lesionseg", "serve", *model, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                httpx.get(url + "/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        idle = rss_mb(server.pid, "VmRSS")

        def post(path: Path) -> int:
            with open(path, "rb") as handle:
                files = {"file": (path.name, handle, "image/png")}
                return httpx.post(url + "/predict", files=files, timeout=600).status_code

        start = time.perf_counter()
        with ThreadPoolExecutor(len(paths)) as pool:
            codes = list(pool.map(post, paths))
        seconds = time.perf_counter() - start
        time.sleep(2)
        return {
            "status_codes": sorted(set(codes)),
            "idle_rss_mb": idle,
            "peak_rss_mb": rss_mb(server.pid, "VmHWM"),
            "rss_after_mb": rss_mb(server.pid, "VmRSS"),
            "seconds": round(seconds, 1),
        }
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="an .onnx model (default: the released one)")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--uploads", type=int, default=12)
    parser.add_argument("--out", type=Path, default=default_out("hostile-memory"))
    args = parser.parse_args()
    model = ["--onnx", args.model] if args.model else []
    with tempfile.TemporaryDirectory() as folder:
        images = Path(folder) / "images"
        images.mkdir()
        paths = write_images(images, args.images)
        results = {
            "images": {"count": args.images, "pixels": SIDE * SIDE, "bytes_on_disk": os.path.getsize(paths[0])},
            "predict": peak_of_predict(images, Path(folder) / "out", model),
            "serve": {"uploads": args.uploads, **peak_of_service(paths[: args.uploads], model)},
        }
    print(write_result(args.out, results))
    print(results)


if __name__ == "__main__":
    main()
