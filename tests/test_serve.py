import base64
import io
import shutil
import socket
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from lesionseg.prediction import TorchPredictor
from lesionseg.serve import create_app


@pytest.fixture(scope="module")
def app(tiny_checkpoint):
    return create_app(TorchPredictor(tiny_checkpoint), max_upload_bytes=200_000)


@pytest.fixture
def client(app):
    return TestClient(app)


def jpeg_bytes(size=(60, 45)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def test_predict_returns_mask_png_and_row(client):
    response = client.post("/predict", files={"file": ("lesion.jpg", jpeg_bytes(), "image/jpeg")})
    assert response.status_code == 200
    body = response.json()
    assert body["file"] == "lesion.jpg" and (body["width"], body["height"]) == (60, 45)
    mask = Image.open(io.BytesIO(base64.b64decode(body["mask_png"])))
    assert mask.size == (60, 45)
    assert body["lesion_pixels"] == int((np.asarray(mask) > 0).sum())
    assert Image.open(io.BytesIO(base64.b64decode(body["overlay_png"]))).size == (60, 45)


@pytest.mark.parametrize("name, content, status, message", [
    ("notes.txt", b"hello, not an image", 415, "notes.txt: not an image"),
    ("cut.jpg", jpeg_bytes()[:300], 400, "cut.jpg: cannot read image"),
    ("empty.png", b"", 400, "empty.png: empty upload"),
    ("huge.jpg", b"\xff" * 300_000, 413, "limit"),
])
def test_bad_uploads_get_a_clear_4xx_and_the_server_keeps_serving(client, name, content, status, message):
    response = client.post("/predict", files={"file": (name, content, "application/octet-stream")})
    assert response.status_code == status
    assert message in response.json()["detail"]
    assert client.post("/predict", files={"file": ("ok.jpg", jpeg_bytes(), "image/jpeg")}).status_code == 200


def test_page_and_health(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="drop"' in page.text and 'type="file"' in page.text
    assert client.get("/health").json() == {"status": "ok", "image_size": 32}


def chromium_path():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium_path() is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_a_person_segments_an_image_in_the_page(app, tmp_path):
    import uvicorn
    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    photo = tmp_path / "lesion.jpg"
    photo.write_bytes(jpeg_bytes((120, 90)))
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium_path(), args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            start = time.perf_counter()
            page.set_input_files("#file", str(photo))
            page.wait_for_selector("#result:not([hidden])", timeout=10_000)
            elapsed = time.perf_counter() - start
            assert page.get_attribute("#overlay", "src").startswith("data:image/png;base64,")
            assert page.text_content('[data-field="width"]') == "120"
            assert "lesion.jpg: done" in page.text_content("#status")
            assert elapsed < 1.0
            bad = tmp_path / "bad.jpg"
            bad.write_text("not an image")
            page.set_input_files("#file", str(bad))
            page.wait_for_function("document.getElementById('error').textContent.length > 0")
            assert "bad.jpg: not an image" in page.text_content("#error")
            browser.close()
    finally:
        server.should_exit = True
        thread.join(5)
