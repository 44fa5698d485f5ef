"""The review page as a door (hostile pages, rebinding, planted links) and its own state (paths, reused stems,
cut journals, odd masks): each case a real folder and a real HTTP request."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import test_review
from conftest import local_client
from lesionseg.cli import main
from lesionseg.images import inspect_mask
from lesionseg.segment.guard import allowed_hosts, host_name
from lesionseg.segment.review import ReviewFolder
from lesionseg.segment.serve import create_app
from test_review import PNG, app_for, png, predicted_folder

review_server = test_review.review_server  # the served folder of the page tests
EVIL = {"origin": "http://evil.example", "content-type": "image/png"}


def blank_of(client: TestClient, index: int = 0) -> bytes:
    item = client.get("/api/items").json()["items"][index]
    return png(np.zeros((item["height"], item["width"]), bool))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return predicted_folder(tmp_path_factory.mktemp("door"), count=3)


def test_a_cross_site_write_is_refused_and_nothing_is_written(folder, tmp_path):
    out = shutil.copytree(folder, tmp_path / "out", symlinks=True)
    client = local_client(app_for(out))
    blank = blank_of(client)
    for headers in (EVIL, {"origin": "null", **PNG}, {"sec-fetch-site": "cross-site", **PNG}):
        for url in ("/api/save/0", "/api/accept/0", "/api/tool/largest/0", "/api/lesion/0"):
            refused = client.post(url, headers=headers, content=blank)
            assert refused.status_code == 403 and "another site" in refused.json()["detail"]
    # a no-cors fetch can only send text/plain, a form or multipart: never image/png without a preflight
    assert client.post("/api/save/0", headers={"content-type": "text/plain"}, content=blank).status_code == 415
    assert not (out / "review" / "masks").exists()
    own = {"origin": "http://127.0.0.1:8001", "sec-fetch-site": "same-origin", **PNG}
    lesion = client.post("/api/lesion/0", headers=own, content=blank).json()  # an empty mask: every column, empty
    assert lesion["descriptors"]["lesion_pixels"] == 0 and lesion["drawing"] == {}
    assert client.post("/api/lesion/0", headers=own, content=b"not a png").status_code == 400
    assert not (out / "review" / "masks").exists()
    assert client.post("/api/save/0", headers=own, content=blank).status_code == 200


def test_a_rebound_host_name_reads_nothing(folder):
    client = local_client(app_for(folder))
    for host in ("rebind.evil.example:8001", "127.0.0.1.evil.example", "", "localhost@evil.example"):
        refused = client.get("/api/image/0", headers={"host": host})
        assert refused.status_code == 403 and "DNS rebinding" in refused.json()["detail"]
    for host in ("localhost:8001", "127.0.0.1:8001", "[::1]:8001", "LOCALHOST."):
        assert client.get("/api/items", headers={"host": host}).status_code == 200
    assert host_name("[::1]:8001") == "::1" and "192.168.1.5" in allowed_hosts("192.168.1.5")
    assert allowed_hosts("127.0.0.1") < allowed_hosts("0.0.0.0")  # every address: this machine's names too
    assert __import__("socket").gethostname().lower() in allowed_hosts("0.0.0.0")
    served = local_client(create_app(__import__("lesionseg.api", fromlist=["x"]).load_predictor()))
    assert served.get("/health", headers={"host": "rebind.evil.example"}).status_code == 403
    assert served.post("/predict", headers={"origin": "http://evil.example"}).status_code == 403


def test_a_link_planted_in_the_folder_is_not_followed(folder, tmp_path):
    out = shutil.copytree(folder, tmp_path / "out", symlinks=True)
    secret = tmp_path / "private.txt"
    secret.write_text("the reviewer's own file")
    stem = ReviewFolder(out).items[0].stem
    (out / "probabilities" / f"{stem}.png").unlink()
    (out / "probabilities" / f"{stem}.png").symlink_to(secret)
    client = local_client(app_for(out))
    reply = client.get("/api/probability/0")
    assert reply.status_code == 400 and "not a file of this folder" in reply.json()["detail"]
    assert b"reviewer" not in reply.content
    (out / "probabilities" / f"{stem}.png").unlink()
    (out / "probabilities" / f"{stem}.png").write_text("not a png at all")  # served only as what it claims
    assert client.get("/api/probability/0").status_code == 400


def test_rows_found_from_the_directory_above_and_a_reused_stem_is_another_photo(folder, tmp_path, monkeypatch):
    study = tmp_path / "study"
    shutil.copytree(folder.parent / "photos", study / "data" / "images")
    monkeypatch.chdir(study)
    assert main(["predict", "data/images", "--out", "out", "--no-progress"]) == 0
    monkeypatch.chdir(tmp_path)
    client = local_client(app_for(Path("study/out")))
    assert client.get("/api/image/0").status_code == 200
    blank = blank_of(client)
    assert client.post("/api/save/0", headers=PNG, content=blank).json()["reviewed"] == 1
    stem = client.get("/api/items").json()["items"][0]["stem"]
    # another photo under the same name, segmented with --overwrite: the old correction is not this photo's
    photo = next((study / "data" / "images").glob(f"{stem}.*"))
    Image.fromarray(np.full((50, 70, 3), 200, np.uint8)).save(photo)
    monkeypatch.chdir(study)
    assert main(["predict", "data/images", "--out", "out", "--no-progress", "--overwrite"]) == 0
    monkeypatch.chdir(tmp_path)
    client = local_client(app_for(Path("study/out")))
    items = {item["stem"]: item for item in client.get("/api/items").json()["items"]}
    assert items[stem]["status"] is None and client.get("/api/items").json()["reviewed"] == 0
    index = items[stem]["index"]
    assert client.post(f"/api/save/{index}", headers=PNG, content=png(np.ones((50, 70), bool))).status_code == 200
    linked = next((study / "out" / "review" / "images").glob(f"{stem}.*"))
    assert linked.resolve() == photo.resolve() and Image.open(linked).size == (70, 50)


def test_a_failed_save_writes_nothing_and_a_cut_journal_line_loses_no_save(folder, tmp_path):
    out = shutil.copytree(folder, tmp_path / "out", symlinks=True)
    client = local_client(app_for(out))
    blank = blank_of(client)
    moved = tmp_path / "moved"
    (folder.parent / "photos").rename(moved)
    try:
        failed = client.post("/api/save/0", headers=PNG, content=blank)
        assert failed.status_code == 400 and "image not found" in failed.json()["detail"]
        assert not list((out / "review").glob("masks/*.png"))
    finally:
        moved.rename(folder.parent / "photos")
    assert client.post("/api/save/0", headers=PNG, content=blank).status_code == 200
    journal = out / "review" / "review.jsonl"
    journal.write_bytes(journal.read_bytes()[:-7])  # power lost in the middle of the last line
    assert client.post("/api/save/1", headers=PNG, content=blank_of(client, 1)).status_code == 200
    lines = journal.read_text().splitlines()
    assert json.loads(lines[-1])["action"] == "corrected"
    assert (
        local_client(app_for(out)).get("/api/items").json()["reviewed"] == 1
    )  # the cut save is gone, the new one kept


def test_odd_masks_posted_or_read(folder, tmp_path):
    out = shutil.copytree(folder, tmp_path / "out", symlinks=True)
    client = local_client(app_for(out))
    item = client.get("/api/items").json()["items"][0]
    h, w = item["height"], item["width"]
    truncated = png(np.ones((h, w), bool))[:40]
    bad = client.post("/api/save/0", headers=PNG, content=truncated)
    assert bad.status_code == 400 and "mask for" in bad.json()["detail"]
    zero_one = np.zeros((h, w), np.uint8)
    zero_one[: h // 2] = 1
    buffer = io.BytesIO()
    Image.fromarray(zero_one).save(buffer, "PNG")
    assert client.post("/api/save/0", headers=PNG, content=buffer.getvalue()).json()["item"]["status"] == "corrected"
    saved = np.asarray(Image.open(out / "review" / "masks" / f"{item['stem']}.png")) > 127
    assert saved[: h // 2].all() and not saved[h // 2 :].any()

    box = np.zeros((60, 90), np.uint8)
    box[10:40, 10:100] = 255
    grey_alpha = Image.fromarray(np.stack([box, np.full_like(box, 255)], -1), "LA")
    grey_alpha.save(tmp_path / "la.png")
    assert inspect_mask(tmp_path / "la.png")[0].sum() == (box > 0).sum()
    palette = Image.fromarray((box > 0).astype(np.uint8), "P")  # index 1 shown as white, index 0 as black
    palette.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    palette.save(tmp_path / "p.png")
    assert inspect_mask(tmp_path / "p.png")[0].sum() == (box > 0).sum()
    dark = Image.fromarray((box > 0).astype(np.uint8) * 1, "P")  # index 1 shown as black: no lesion anywhere
    dark.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)
    dark.save(tmp_path / "dark.png")
    assert inspect_mask(tmp_path / "dark.png")[0].sum() == (box == 0).sum()


def test_accept_keeps_a_saved_correction_and_bad_rows_are_told(folder, tmp_path):
    out = shutil.copytree(folder, tmp_path / "out", symlinks=True)
    client = local_client(app_for(out))
    item = client.get("/api/items").json()["items"][0]
    corrected = np.ones((item["height"], item["width"]), bool)
    client.post("/api/save/0", headers=PNG, content=png(corrected))
    assert client.post("/api/accept/0").json()["item"]["status"] == "corrected"
    assert (np.asarray(Image.open(out / "review" / "masks" / f"{item['stem']}.png")) > 127).all()
    assert client.get("/api/items").json()["corrected"] == 1
    steps = client.get("/api/items").json()["next"]
    assert steps[0].startswith("lesionseg adapt --data") and "--onnx" in steps[1] and "review" not in steps[1]

    rows = json.loads((out / "predictions.json").read_text())
    rows[-1]["mask"] = 7
    (out / "predictions.json").write_text(json.dumps(rows))
    folder_view = ReviewFolder(out)
    assert folder_view.unreadable == 1 and len(folder_view.items) == 2


def launched(playwright):
    from test_review import chromium_path

    return playwright.chromium.launch(
        executable_path=chromium_path(), args=["--no-sandbox", "--disable-gpu", "--no-first-run"]
    )


@pytest.mark.skipif(__import__("shutil").which("chromium") is None, reason="Debian's chromium is not installed")
def test_a_page_on_another_site_cannot_write_through_the_reviewers_browser(review_server, tmp_path):
    """A hostile page served from another origin sends the reviewer's browser to save a blank mask, the way the
    issue's attack does (a no-cors fetch, which needs no preflight): nothing is written."""
    import http.server
    import socket
    import threading

    from playwright.sync_api import sync_playwright

    url, out = review_server
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "index.html").write_text(
        "<script>const blank = new Blob([new Uint8Array([137,80,78,71,13,10,26,10])], {type: 'image/png'});"
        f"Promise.allSettled([fetch('{url}api/save/0', {{method: 'POST', mode: 'no-cors', body: blank}}),"
        f"fetch('{url}api/accept/1', {{method: 'POST', mode: 'no-cors'}}),"
        f"fetch('{url}api/save/2', {{method: 'POST', body: blank}})])"
        ".then(() => document.title = 'sent');</script>"
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(evil))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with sync_playwright() as p:
            browser = launched(p)
            page = browser.new_page()
            page.goto(f"http://localhost:{port}/index.html")
            page.wait_for_function("document.title === 'sent'")
            browser.close()
    finally:
        server.shutdown()
    assert not (out / "review" / "masks").exists() or not list((out / "review" / "masks").iterdir())
    assert not (out / "review" / "review.jsonl").exists()


@pytest.mark.skipif(__import__("shutil").which("chromium") is None, reason="Debian's chromium is not installed")
@pytest.mark.parametrize("width, height", [(1280, 720), (1440, 900), (1920, 1080)])
def test_the_whole_image_is_on_screen_without_scrolling(review_server, width, height):
    from playwright.sync_api import sync_playwright

    url, _ = review_server
    with sync_playwright() as p:
        browser = launched(p)
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(url)
        page.wait_for_function("performance.getEntriesByName('opened-0').length === 1")
        box = page.locator("#photo").bounding_box()
        assert box["y"] >= 0 and box["y"] + box["height"] <= height and box["x"] + box["width"] <= width
        assert box["height"] > height * 0.5  # as large as the view allows, not a thumbnail
        assert page.evaluate("document.scrollingElement.scrollHeight") <= height
        browser.close()
