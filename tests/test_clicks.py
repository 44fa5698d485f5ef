"""Click to correct: the click protocol, `lesionseg.load().refine`, the review page's click tool (API and browser),
and the click model's training and export (a few steps)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from conftest import fake_click_model, local_client
from lesionseg.errors import DataError
from lesionseg.segment.clicks import CLICK_MODEL_ENV, click_maps, next_click
from test_review import PNG, app_for, png, predicted_folder


@pytest.fixture
def clicks_model(tmp_path, monkeypatch):
    path = fake_click_model(tmp_path / "fake-clicks.onnx")
    monkeypatch.setenv(CLICK_MODEL_ENV, str(path))
    return path


def test_the_next_click_goes_to_the_deepest_point_of_the_larger_error():
    truth = np.zeros((40, 40), bool)
    truth[5:35, 5:35] = True
    predicted = truth.copy()
    predicted[10:30, 10:20] = False  # a 20x10 miss
    predicted[0:4, 36:40] = True  # a small extra
    (x, y), positive = next_click(predicted, truth)
    assert positive and 10 <= y < 30 and 13 <= x <= 16
    assert next_click(truth, truth) is None
    maps = click_maps([(x, y)], [(0.0, 0.0)], 40, 40, 20)
    assert maps[0].sum() > 0 and maps[0][y // 2, x // 2] == 1 and maps[1][0, 0] == 1


def test_refine_adds_where_clicked_removes_where_clicked_and_refuses_bad_clicks(clicks_model):
    import lesionseg

    model = lesionseg.load()
    image = np.full((96, 128, 3), 180, np.uint8)
    added = model.refine(image, positive=[(30, 40)])
    assert added.mask[40, 30] and not added.mask[80, 110] and added.mask.shape == (96, 128)
    removed = model.refine(image, negative=[(30, 40)], mask=added.mask)
    assert not removed.mask[40, 30]
    for bad, said in [([(500, 3)], "outside the 128x96 image"), ([(np.nan, 3)], "not a finite point"),
                      ([(1, 2, 3)], r"not an \(x, y\) pair"), ([(1, 1)] * 101, "at most 100")]:  # fmt: skip
        with pytest.raises(DataError, match=said) as refused:
            model.refine(image, positive=bad)
        assert "\n" not in str(refused.value)


def test_the_page_answers_a_click_from_the_folders_image_and_saves_nothing(clicks_model, tmp_path):
    out = predicted_folder(tmp_path, count=2)
    client = local_client(app_for(out))
    item = client.get("/api/items").json()["items"][0]
    h, w = item["height"], item["width"]
    assert client.get("/api/tools").json()["click"] == "mask and clicks"
    empty = png(np.zeros((h, w), bool))
    reply = client.post("/api/tool/click/0?positive=5,6&negative=", headers=PNG, content=empty)
    mask = np.asarray(Image.open(io.BytesIO(reply.content))) > 127
    assert reply.status_code == 200 and mask[6, 5] and mask.sum() < mask.size / 4
    for query, said in [("positive=1e9,1", "outside"), ("positive=nan,1", "finite"), ("negative=a,b", "not x,y")]:
        bad = client.post(f"/api/tool/click/0?{query}", headers=PNG, content=empty)
        assert bad.status_code == 400 and said in bad.json()["detail"]
    many = ";".join(["1,1"] * 101)
    assert client.post(f"/api/tool/click/0?positive={many}", headers=PNG, content=empty).status_code == 400
    assert not (out / "review" / "masks").exists()


@pytest.mark.skipif(__import__("shutil").which("chromium") is None, reason="Debian's chromium is not installed")
def test_clicks_in_the_browser_add_remove_and_undo(clicks_model, tmp_path):
    import socket
    import threading
    import time

    import uvicorn
    from playwright.sync_api import sync_playwright

    from test_review_door import launched

    out = predicted_folder(tmp_path, count=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app_for(out), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    try:
        with sync_playwright() as p:
            browser = launched(p)
            page = browser.new_page(viewport={"width": 1280, "height": 720})
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_function("performance.getEntriesByName('opened-0').length === 1")
            page.keyboard.press("k")
            box = page.locator("#overlay").bounding_box()
            lesion = "mask.reduce((a, b) => a + b, 0)"
            before = page.evaluate(lesion)
            page.mouse.click(box["x"] + 4, box["y"] + 4)  # a corner the model left out
            page.wait_for_function("performance.getEntriesByName('clicked-0-1').length === 1")
            after_add = page.evaluate(lesion)
            assert after_add > before and page.evaluate("mask[2 * width + 2]") == 1
            cx, cy, w, h = page.evaluate(  # the synthetic disc's centre (the corner click's disk left out)
                """(() => { let sx = 0, sy = 0, n = 0;
                  for (let i = 0; i < mask.length; i++) { const x = i % width, y = Math.floor(i / width);
                    if (mask[i] && (x > 12 || y > 12)) { sx += x; sy += y; n++; } }
                  return [Math.round(sx / n), Math.round(sy / n), width, height]; })()"""
            )
            centre = f"mask[{cy} * width + {cx}]"
            assert page.evaluate(centre) == 1
            page.mouse.click(
                box["x"] + (cx + 0.5) * box["width"] / w, box["y"] + (cy + 0.5) * box["height"] / h, button="right"
            )
            page.wait_for_function("performance.getEntriesByName('clicked-0-2').length === 1")
            assert page.evaluate(centre) == 0 and page.evaluate("mask[2 * width + 2]") == 1
            page.keyboard.press("z")
            assert page.evaluate(centre) == 1 and page.evaluate("clicks.negative.length") == 0
            page.keyboard.press("n")  # another image: its own clicks, none yet
            page.wait_for_function("current === 1")
            assert page.evaluate("clicks.positive.length + clicks.negative.length + history.length") == 0
            browser.close()
    finally:
        server.should_exit = True


def test_the_click_model_trains_resumes_and_exports(tmp_path):
    from conftest import write_plain_pairs
    from lesionseg.segment.clicks import ClickModel
    from lesionseg.train.clicks import export_saved, run_train_clicks

    data = write_plain_pairs(tmp_path / "data", 6, size=48)
    out = tmp_path / "run"
    run_train_clicks([str(data)], out, steps=2, batch_size=2)
    assert (out / "clicks.onnx").is_file()
    with pytest.raises(Exception, match="--resume"):
        run_train_clicks([str(data)], out, steps=3, batch_size=2)
    from lesionseg.cli import main

    assert (
        main(["train-clicks", "--data", str(data), "--out", str(out), "--steps", "3", "--batch-size", "2", "--resume"])
        == 0
    )
    steps = [line for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(steps) == 3
    model = ClickModel(export_saved(out))
    probability = model(np.zeros((3, 128, 128), np.uint8), np.zeros((3, 128, 128), np.float32))
    assert probability.shape == (128, 128) and model.version.startswith("step 3")


def test_a_moved_start_grows_or_shrinks_the_outline_evenly():
    """Training moves some start masks' outlines in or out (another clinic's style): the area changes by up to
    MOVE of the radius, the result stays one blob around the same centre, and an empty mask stays empty."""
    from lesionseg.train.clicks import MOVE, moved

    yy, xx = np.mgrid[:128, :128]
    disk = (yy - 64) ** 2 + (xx - 60) ** 2 <= 30**2
    rng = np.random.default_rng(0)
    radii = []
    for _ in range(40):
        mask = moved(disk, rng)
        radii.append(np.sqrt(mask.sum() / np.pi))
        rows, cols = np.nonzero(mask)
        assert abs(rows.mean() - 64) < 1 and abs(cols.mean() - 60) < 1
    assert min(radii) >= 30 * (1 - MOVE) - 1.5 and max(radii) <= 30 * (1 + MOVE) + 1.5
    assert min(radii) < 27 and max(radii) > 33  # both ways
    assert not moved(np.zeros((8, 8), bool), rng).any()
