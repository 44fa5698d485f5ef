"""How long the review page takes the user: from opening a mask to its saved correction, for the common path
(threshold tighter, save), a brush fix and a click fix (one positive click; the click model redraws the border;
also its click-to-outline time), on 100 real images (the click model: $LESIONSEG_CLICK_MODEL or the shipped one); and whether a 10,000-image folder stays
responsive (the list loads in pages of 50; server memory and request times).

The clicks and keys are scripted in a real browser (Playwright + Debian's chromium), so the figures are the
page's and the server's own time, without a person's: what a reviewer waits for on each image.

    .venv/bin/python benchmarks/review_time.py --images runs/ham10000-split/external/test/images --count 100 \
        --out benchmarks/results/review_time/review-100.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
from PIL import Image

from common import write_result
from lesionseg.api import load_predictor
from lesionseg.cli import main as lesionseg_main
from lesionseg.segment.pipeline import Pipeline
from lesionseg.segment.review import ReviewFolder
from lesionseg.segment.review_app import create_review_app, recomputer

BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"]  # fmt: skip


def serve(folder: Path):
    import uvicorn

    pipeline = Pipeline(load_predictor())
    app = create_review_app(ReviewFolder(folder), recomputer(pipeline), pipeline.threshold)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}/"


def timed_reviews(url: str, count: int) -> dict:
    """Each image: wait until it is open, act, save; the time from 'opened' to 'saved' as the page marks them."""
    from playwright.sync_api import sync_playwright

    seconds, outline_ms = {"threshold": [], "brush": [], "click": []}, []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        start = time.perf_counter()
        page.goto(url)
        page.wait_for_function("performance.getEntriesByName('opened-0').length === 1")
        first_open = time.perf_counter() - start
        for index in range(count):
            page.wait_for_function(f"performance.getEntriesByName('opened-{index}').length === 1")
            page.wait_for_timeout(150)  # the probability map, fetched after the image
            path = ("threshold", "brush", "click")[index % 3]
            if path == "threshold":
                for _ in range(5):
                    page.keyboard.press(".")
            elif path == "click":  # one positive click where the brush stroke would start; the model redraws
                page.keyboard.press("k")
                box = page.locator("#overlay").bounding_box()
                page.mouse.click(box["x"] + box["width"] * 0.4, box["y"] + box["height"] * 0.4)
                page.wait_for_function(f"performance.getEntriesByName('clicked-{index}-1').length === 1")
                page.keyboard.press("b")
                marks = [f"performance.getEntriesByName('{m}-{index}-1')[0].startTime" for m in ("click", "clicked")]
                outline_ms.append(page.evaluate(marks[1]) - page.evaluate(marks[0]))
            else:
                box = page.locator("#overlay").bounding_box()
                page.mouse.move(box["x"] + box["width"] * 0.4, box["y"] + box["height"] * 0.4)
                page.mouse.down()
                page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.5, steps=10)
                page.mouse.up()
            page.keyboard.press("s")
            page.wait_for_function(f"performance.getEntriesByName('saved-{index}').length === 1")
            opened = page.evaluate(f"performance.getEntriesByName('opened-{index}')[0].startTime")
            saved = page.evaluate(f"performance.getEntriesByName('saved-{index}')[0].startTime")
            seconds[path].append((saved - opened) / 1000 - 0.15)  # less the fixed wait above
        browser.close()
    return {
        "first_image_open_s": first_open,
        **{f"{k}_median_s": float(np.median(v)) for k, v in seconds.items()},
        **{f"{k}_p90_s": float(np.quantile(v, 0.9)) for k, v in seconds.items()},
        "images": count,
        "click_to_outline_ms_median": float(np.median(outline_ms)) if outline_ms else None,
        "click_to_outline_ms_p90": float(np.quantile(outline_ms, 0.9)) if outline_ms else None,
    }


def large_folder(rows: int, work: Path) -> dict:
    """A folder of `rows` masks (tiny images, so that only the list's size matters): server memory and times."""
    from fastapi.testclient import TestClient

    photos, out = work / "many", work / "many-out"
    (out / "masks").mkdir(parents=True)
    photos.mkdir()
    image, mask = np.full((40, 40, 3), 150, np.uint8), np.zeros((40, 40), np.uint8)
    Image.fromarray(image).save(photos / "base.png")
    Image.fromarray(mask).save(out / "masks" / "base.png")
    table = []
    rng = np.random.default_rng(0)
    for n in range(rows):
        stem = f"IMG_{n:05d}"
        (photos / f"{stem}.png").hardlink_to(photos / "base.png")
        (out / "masks" / f"{stem}.png").hardlink_to(out / "masks" / "base.png")
        quality = float(rng.uniform(0.4, 1.0))
        table.append({"file": str(photos / f"{stem}.png"), "width": 40, "height": 40, "mask": f"masks/{stem}.png",
                      "quality": quality, "review": quality < 0.7})  # fmt: skip
    (out / "predictions.json").write_text(json.dumps(table))
    tracemalloc.start()
    start = time.perf_counter()
    folder = ReviewFolder(out)
    opened = time.perf_counter() - start
    held = tracemalloc.get_traced_memory()[0]
    pipeline = Pipeline(load_predictor())
    client = TestClient(create_review_app(folder, recomputer(pipeline), 0.5), base_url="http://127.0.0.1:8001")
    times = []
    for offset in (0, rows // 2, rows - 50):
        start = time.perf_counter()
        page = client.get(f"/api/items?offset={offset}&limit=50").json()
        times.append(time.perf_counter() - start)
        assert len(page["items"]) == 50
    start = time.perf_counter()
    client.post(f"/api/accept/{rows - 1}")
    save = time.perf_counter() - start
    return {
        "rows": rows,
        "folder_open_s": opened,
        "list_page_s_max": max(times),
        "accept_s": save,
        "folder_python_mib": held / 2**20,  # what the server holds for the list: its rows, in review order
        "peak_python_mib_with_requests": tracemalloc.get_traced_memory()[1] / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True, help="a folder of real dermoscopy images")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--rows", type=int, default=10_000, help="the large folder's size")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        photos = work / "photos"
        photos.mkdir()
        for path in sorted(args.images.iterdir())[: args.count]:
            shutil.copy(path, photos / path.name)
        out = work / "out"
        assert lesionseg_main(["predict", str(photos), "--out", str(out), "--probabilities", "--no-progress"]) == 0
        server, url = serve(out)
        try:
            results = {"review": timed_reviews(url, args.count)}
        finally:
            server.should_exit = True
        results["large_folder"] = large_folder(args.rows, work)
    write_result(args.out, results)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
