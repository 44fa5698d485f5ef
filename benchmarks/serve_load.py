"""A bounded load test of `lesionseg serve`: it starts the server on 127.0.0.1, sends a fixed number of
POST /predict requests from N concurrent clients (stopping at a time limit), and reports requests/s,
p50/p95/max latency, errors and the server's peak RSS. Nothing leaves the machine.

    .venv/bin/python benchmarks/serve_load.py --image photo.png --clients 8 --requests 80
    .venv/bin/python benchmarks/serve_load.py --synthetic 765x572.png --clients 1 8 --requests 40 \
        --out benchmarks/results/serve_load/serve-load.json   # extra args after -- go to `lesionseg serve`
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from common import write_result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def synthetic_image(spec: str, folder: Path) -> Path:
    """WIDTHxHEIGHT.(png|jpg): a dermoscopy-like picture (a dark disc on skin tones) with mild sensor-like
    noise, so that PNG and JPEG sizes, and so decoding times, are those of photos (about 1 MB for a
    765x572 PNG), not of flat colour or of pure noise."""
    size, _, suffix = spec.partition(".")
    width, height = map(int, size.split("x"))
    yy, xx = np.mgrid[:height, :width]
    disc = ((yy - height / 2) ** 2 + (xx - width / 2) ** 2) < (min(width, height) / 3) ** 2
    shade = (yy / height * 30).astype(np.int16)[..., None]
    noise = np.random.default_rng(0).normal(0, 4, (height, width, 3))
    pixels = np.where(disc[..., None], [90, 60, 50], [200, 160, 140]) + shade + noise
    path = folder / f"{size}.{suffix}"
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=92)
    return path


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def start_server(port: int, serve_args: list[str], src: Path | None = None) -> subprocess.Popen:
    """`lesionseg serve` from the installed package, or from another checkout's src/ (before/after runs)."""
    env = {**os.environ, "PYTHONPATH": str(src.resolve())} if src else None
    server = subprocess.Popen(
        [sys.executable, "-m", "lesionseg", "serve", "--port", str(port), *serve_args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited: {server.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("the server did not start within 120 s")


def load(url: str, payload: bytes, name: str, clients: int, requests: int, time_limit: float) -> dict:
    """`requests` POSTs from `clients` threads, each request timed from send to full answer."""
    latencies, errors = [], 0
    stop_at = time.perf_counter() + time_limit
    local = threading.local()  # one keep-alive connection per client, as a browser or a script holds one

    def one(_: int) -> float | None:
        if time.perf_counter() > stop_at:
            return None
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=time_limit)
        begin = time.perf_counter()
        response = local.client.post(url, files={"file": (name, payload)})
        response.raise_for_status()
        return time.perf_counter() - begin

    begin = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(one, n) for n in range(requests)]:
            try:
                latency = future.result()
            except httpx.HTTPError:
                errors += 1
                continue
            if latency is not None:
                latencies.append(latency)
    elapsed = time.perf_counter() - begin
    latencies.sort()
    return {
        "clients": clients,
        "sent": len(latencies) + errors,
        "errors": errors,
        "seconds": elapsed,
        "requests_per_s": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies) if latencies else None,
        "p95_ms": 1000 * latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] if latencies else None,
        "max_ms": 1000 * latencies[-1] if latencies else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", type=Path, help="the file every request uploads")
    source.add_argument("--synthetic", help="WIDTHxHEIGHT.png or .jpg: make one")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8], help="concurrent clients, one run each")
    parser.add_argument("--requests", type=int, default=40, help="requests per run")
    parser.add_argument("--time-limit", type=float, default=120, help="seconds per run at most")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    parser.add_argument(
        "--src", type=Path, help="run the server from this src/ folder (e.g. a worktree of an older commit)"
    )
    args, serve_args = parser.parse_known_args()
    serve_args = [a for a in serve_args if a != "--"]
    with tempfile.TemporaryDirectory() as folder:
        image = args.image or synthetic_image(args.synthetic, Path(folder))
        payload = image.read_bytes()
        port = free_port()
        server = start_server(port, serve_args, args.src)
        try:
            url = f"http://127.0.0.1:{port}/predict"
            load(url, payload, image.name, 1, 2, args.time_limit)  # warm-up: first-request costs are not load
            runs = [load(url, payload, image.name, clients, args.requests, args.time_limit) for clients in args.clients]
            rss = peak_rss_mb(server.pid)
        finally:
            server.terminate()
            server.wait(10)
    with Image.open(io.BytesIO(payload)) as im:
        size = f"{im.width}x{im.height} {im.format}"
    result = {
        "image": size,
        "bytes": len(payload),
        "serve_args": serve_args,
        "src": str(args.src or "installed"),
        "server_peak_rss_mb": rss,
        "runs": runs,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    main()
