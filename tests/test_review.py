"""`lesionseg review`: the least trusted masks first; accepts and corrections saved beside the model's masks as a
data folder adapt reads; tested through its API and in a real browser."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import disc_pair, local_client
from lesionseg.api import load_predictor
from lesionseg.cli import main
from lesionseg.errors import LesionsegError
from lesionseg.segment.encoders import mask_png_8bit
from lesionseg.segment.pipeline import Pipeline
from lesionseg.segment.review import ReviewFolder, holding, review_order
from lesionseg.segment.review_app import create_review_app, recomputer


def predicted_folder(tmp_path: Path, count: int = 6, probabilities: bool = True) -> Path:
    """A predict folder of the released model (which ships a quality estimate) over synthetic lesions."""
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(3)
    for n in range(count):
        size = 64 + 16 * n
        Image.fromarray(disc_pair(rng, size)[0]).save(photos / f"lesion_{n}.png")
    out = tmp_path / "out"
    extra = ["--probabilities"] if probabilities else []
    assert main(["predict", str(photos), "--out", str(out), "--no-progress", *extra]) == 0
    return out


PNG = {"content-type": "image/png"}


def app_for(out: Path):
    pipeline = Pipeline(load_predictor())
    return create_review_app(ReviewFolder(out), recomputer(pipeline), pipeline.threshold)


def png(mask: np.ndarray) -> bytes:
    return mask_png_8bit(mask)


def test_flagged_first_then_lowest_quality_then_no_estimate():
    rows = [
        {"mask": "masks/a.png", "quality": 0.9, "review": False},
        {"mask": "masks/b.png", "quality": 0.5, "review": True},
        {"mask": "masks/c.png", "quality": 0.8, "review": False},
        {"mask": "masks/d.png"},
        {"mask": "masks/e.png", "quality": 0.6, "review": True},
    ]
    assert [r["mask"][6] for r in review_order(rows)] == ["b", "e", "c", "a", "d"]


def test_saves_go_beside_the_models_masks_as_a_data_folder_adapt_reads(tmp_path):
    out = predicted_folder(tmp_path)
    models = {p.name: p.read_bytes() for p in (out / "masks").iterdir()}
    client = local_client(app_for(out))
    page = client.get("/api/items?offset=0&limit=50").json()
    assert page["total"] == 6 and page["reviewed"] == 0 and len(page["items"]) == 6
    qualities = [i["quality"] for i in page["items"] if not i["flagged"]]
    assert qualities == sorted(qualities)
    first = page["items"][0]
    mask = np.zeros((first["height"], first["width"]), bool)
    mask[5:20, 5:30] = True
    reply = client.post("/api/save/0", headers=PNG, content=png(mask)).json()
    assert reply["reviewed"] == 1 and reply["item"]["status"] == "corrected"
    assert client.post("/api/accept/1").json()["reviewed"] == 2
    saved = out / "review" / "masks" / f"{first['stem']}.png"
    assert np.array_equal(np.asarray(Image.open(saved)) > 127, mask)
    assert set(np.unique(np.asarray(Image.open(saved)))) == {0, 255}
    assert {p.name: p.read_bytes() for p in (out / "masks").iterdir()} == models  # never written
    journal = [json.loads(line) for line in (out / "review" / "review.jsonl").read_text().splitlines()]
    assert [e["action"] for e in journal] == ["corrected", "accepted"]
    from lesionseg.train.data import find_pairs

    pairs, problems = find_pairs(out / "review", "train")
    assert len(pairs) == 2 and not problems
    reopened = local_client(app_for(out)).get("/api/items").json()
    assert reopened["reviewed"] == 2 and reopened["first_open"] == 2  # resumes where the user stopped


def test_bad_masks_and_requests_are_one_line_and_write_nothing(tmp_path):
    out = predicted_folder(tmp_path, count=2)
    client = local_client(app_for(out))
    item = client.get("/api/items").json()["items"][0]
    wrong = client.post("/api/save/0", headers=PNG, content=png(np.zeros((7, 9), bool)))
    assert wrong.status_code == 400 and f"but the image is {item['width']}x{item['height']}" in wrong.json()["detail"]
    assert client.post("/api/save/0", headers=PNG, content=b"not a png").status_code == 400
    assert client.post("/api/save/99", headers=PNG, content=b"").status_code == 404
    assert client.post("/api/save/0", headers=PNG, content=b"\0" * (17 * 2**20)).status_code == 413
    unknown = client.post(
        "/api/tool/explode/0", headers=PNG, content=png(np.zeros((item["height"], item["width"]), bool))
    )
    assert unknown.status_code == 404 and "the tools are fill_holes, largest, click" in unknown.json()["detail"]
    assert not (out / "review" / "masks").exists() or not list((out / "review" / "masks").iterdir())


def test_refinements_fill_holes_and_keep_the_largest_piece(tmp_path):
    out = predicted_folder(tmp_path, count=1)
    client = local_client(app_for(out))
    item = client.get("/api/items").json()["items"][0]
    mask = np.zeros((item["height"], item["width"]), bool)
    mask[10:40, 10:40], mask[20:25, 20:25], mask[50:55, 50:55] = True, False, True
    filled = (
        np.asarray(
            Image.open(
                __import__("io").BytesIO(client.post("/api/tool/fill_holes/0", headers=PNG, content=png(mask)).content)
            )
        )
        > 127
    )
    assert filled[22, 22] and filled[52, 52]
    largest = (
        np.asarray(
            Image.open(
                __import__("io").BytesIO(client.post("/api/tool/largest/0", headers=PNG, content=png(mask)).content)
            )
        )
        > 127
    )
    assert not largest[52, 52] and largest[15, 15]


def test_a_folder_predict_did_not_write_is_refused_and_one_page_per_folder(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    with pytest.raises(LesionsegError, match="not a folder lesionseg predict finished"):
        ReviewFolder(tmp_path / "mine")
    assert main(["review", str(tmp_path / "mine")]) == 2
    assert "not a folder lesionseg predict finished" in capsys.readouterr().err
    out = predicted_folder(tmp_path, count=1)
    with holding(ReviewFolder(out)), pytest.raises(LesionsegError, match="in use by lesionseg"):
        with holding(ReviewFolder(out)):
            pass


def test_the_probability_map_is_recomputed_when_predict_did_not_save_it(tmp_path):
    out = predicted_folder(tmp_path, count=1, probabilities=False)
    client = local_client(app_for(out))
    item = client.get("/api/items").json()["items"][0]
    grey = np.asarray(Image.open(__import__("io").BytesIO(client.get("/api/probability/0").content)))
    model_mask = np.asarray(Image.open(out / "masks" / f"{item['stem']}.png")) > 127
    assert grey.shape == model_mask.shape and ((grey >= 128) == model_mask).mean() > 0.99


def chromium_path():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def review_server(tmp_path):
    import uvicorn

    out = predicted_folder(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app_for(out), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/", out
    server.should_exit = True
    thread.join(5)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.skipif(chromium_path() is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_a_person_reviews_corrects_and_resumes_in_the_browser(review_server, tmp_path):
    """Open the folder, draw a stroke and save; tighten the threshold and save with the keyboard; accept with the
    keyboard; reload and resume; the files on disk checked after each."""
    from playwright.sync_api import sync_playwright

    url, out = review_server
    shots = Path(os.environ.get("LESIONSEG_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    models = {p.name: digest(p) for p in (out / "masks").iterdir()}
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium_path(),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"],
        )  # fmt: skip
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(url)
        page.wait_for_function("document.querySelectorAll('#list li').length === 6")
        page.wait_for_function("document.getElementById('message').textContent === ''")
        assert "0 reviewed / " in page.text_content("#progress") and "/ 6 total" in page.text_content("#progress")
        page.screenshot(path=shots / "review-open.png")
        names = page.locator("#list li .name").all_text_contents()
        first = names[0]

        box = page.locator("#overlay").bounding_box()  # a brush stroke across the top-left of the image
        page.mouse.move(box["x"] + 3, box["y"] + 3)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + 8, steps=8)
        page.mouse.up()
        page.click("#save")
        page.wait_for_function("document.getElementById('progress').textContent.startsWith('1 reviewed')")
        corrected = np.asarray(Image.open(out / "review" / "masks" / f"{first}.png")) > 127
        model = np.asarray(Image.open(out / "masks" / f"{first}.png")) > 127
        assert corrected.shape == model.shape and corrected[2, 2] and not model[2, 2]

        second = names[1]
        page.wait_for_function(f"document.getElementById('name').textContent.includes('{second}')")
        page.wait_for_timeout(300)  # the probability map arrives after the image
        for _ in range(10):  # a tighter outline: threshold 0.5 -> 0.7
            page.keyboard.press(".")
        assert page.text_content("#threshold-value") == "0.70"
        page.screenshot(path=shots / "review-threshold.png")
        page.keyboard.press("s")
        page.wait_for_function("document.getElementById('progress').textContent.startsWith('2 reviewed')")
        tighter = np.asarray(Image.open(out / "review" / "masks" / f"{second}.png")) > 127
        grey = np.asarray(Image.open(out / "probabilities" / f"{second}.png"))
        assert np.array_equal(tighter, grey >= 0.7 * 255)

        page.wait_for_function(f"document.getElementById('name').textContent.includes('{names[2]}')")
        page.keyboard.press("a")
        page.wait_for_function("document.getElementById('progress').textContent.startsWith('3 reviewed')")
        assert digest(out / "review" / "masks" / f"{names[2]}.png") == digest(out / "masks" / f"{names[2]}.png")

        page.reload()
        page.wait_for_function("document.querySelectorAll('#list li').length === 6")
        page.wait_for_function(f"document.getElementById('name').textContent.includes('{names[3]}')")
        assert page.text_content("#progress").startswith("3 reviewed")
        assert page.locator("#list li .done").all_text_contents()[:4] == ["✓", "✓", "✓", ""]
        page.screenshot(path=shots / "review-resumed.png")
        browser.close()
    journal = [json.loads(line)["action"] for line in (out / "review" / "review.jsonl").read_text().splitlines()]
    assert journal == ["corrected", "corrected", "accepted"]
    assert {p.name: digest(p) for p in (out / "masks").iterdir()} == models
