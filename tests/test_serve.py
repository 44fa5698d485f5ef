import base64
import io
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import local_client
from lesionseg.segment.quality import FEATURES, QualityModel
from lesionseg.segment.serve import create_app
from lesionseg.train.predictor import TorchPredictor


@pytest.fixture(scope="module")
def app(tiny_checkpoint):
    return create_app(TorchPredictor(tiny_checkpoint), max_upload_bytes=200_000)


@pytest.fixture
def client(app):
    return local_client(app)


def jpeg_bytes(size=(60, 45)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
        buffer, "JPEG"
    )
    return buffer.getvalue()


def test_predict_returns_mask_png_and_row(client):
    response = client.post("/predict", files={"file": ("lesion.jpg", jpeg_bytes(), "image/jpeg")})
    assert response.status_code == 200
    body = response.json()
    assert body["file"] == "lesion.jpg" and (body["width"], body["height"]) == (60, 45)
    mask = Image.open(io.BytesIO(base64.b64decode(body["mask_png"])))
    assert mask.size == (60, 45)
    assert body["lesion_pixels"] == int((np.asarray(mask) > 0).sum())
    assert "overlay_png" not in body  # the page draws the outline from the mask
    with_overlay = client.post(
        "/predict?overlay=true", files={"file": ("lesion.jpg", jpeg_bytes(), "image/jpeg")}
    ).json()
    assert Image.open(io.BytesIO(base64.b64decode(with_overlay["overlay_png"]))).size == (60, 45)
    assert with_overlay["mask_png"] == body["mask_png"]


def test_large_jpeg_is_decoded_reduced_and_the_mask_comes_back_at_full_size(client):
    """A 1000x750 JPEG reaches the 32 px model decoded at 1/8 scale; the mask still has the upload's own size
    and the same lesion as a whole decode would give, within a few pixels of the outline."""
    yy, xx = np.mgrid[:750, :1000]
    photo = np.where((((yy - 375) ** 2 + (xx - 500) ** 2) < 250**2)[..., None], 60, 200).astype(np.uint8).repeat(3, 2)
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, "JPEG", quality=90)
    reduced = client.post("/predict", files={"file": ("big.jpg", buffer.getvalue(), "image/jpeg")}).json()
    whole = client.post("/predict?overlay=true", files={"file": ("big.jpg", buffer.getvalue(), "image/jpeg")}).json()
    masks = [np.asarray(Image.open(io.BytesIO(base64.b64decode(r["mask_png"])))) for r in (reduced, whole)]
    assert masks[0].shape == masks[1].shape == (750, 1000)
    assert (masks[0] != masks[1]).mean() < 0.01


def test_concurrent_requests_share_model_batches(app):
    """Eight clients at once: every reply is right and the model ran fewer times than there were requests."""
    from concurrent.futures import ThreadPoolExecutor

    client = local_client(app)
    batcher = app.state.batcher
    calls_before = len(batcher.batch_sizes)
    with ThreadPoolExecutor(8) as pool:
        replies = list(
            pool.map(
                lambda n: client.post("/predict", files={"file": (f"{n}.jpg", jpeg_bytes(), "image/jpeg")}), range(32)
            )
        )
    assert [r.status_code for r in replies] == [200] * 32
    assert len({r.json()["mask_png"] for r in replies}) == 1  # same image, same mask, whatever the batch
    sizes = batcher.batch_sizes[calls_before:]
    assert sum(sizes) == 32 and len(sizes) < 32 and max(sizes) > 1


def test_batcher_passes_model_errors_to_each_request_and_refuses_when_full():
    from lesionseg.segment.serve import MicroBatcher, ServerBusy

    class Broken:
        image_size, threshold, name, version = 8, 0.5, "broken", "0"

        def __call__(self, images):
            raise RuntimeError("model failed")

    batcher = MicroBatcher(Broken())
    with pytest.raises(RuntimeError, match="model failed"):
        batcher(np.zeros((2, 3, 8, 8), np.uint8))
    batcher.close()
    stalled = MicroBatcher(Broken(), max_waiting=1)
    stalled.close()  # no worker now: one image fills the queue and the next is refused, not queued forever
    stalled.submit(np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(ServerBusy, match="1 images already wait"):
        stalled.submit(np.zeros((3, 8, 8), np.uint8))


@pytest.mark.parametrize(
    "name, content, status, message",
    [
        ("notes.txt", b"hello, not an image", 415, "notes.txt: not an image"),
        ("cut.jpg", jpeg_bytes()[:300], 400, "cut.jpg: cannot read image"),
        ("empty.png", b"", 400, "empty.png: empty upload"),
        ("huge.jpg", b"\xff" * 300_000, 413, "limit"),
    ],
)
def test_bad_uploads_get_a_clear_4xx_and_the_server_keeps_serving(client, name, content, status, message):
    response = client.post("/predict", files={"file": (name, content, "application/octet-stream")})
    assert response.status_code == status
    assert message in response.json()["detail"]
    assert client.post("/predict", files={"file": ("ok.jpg", jpeg_bytes(), "image/jpeg")}).status_code == 200


def test_page_and_health(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="drop"' in page.text and 'type="file"' in page.text
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["image_size"] == 32
    assert health["model"] == "model2-finetune (seed, 32 px)" and health["version"].startswith("best.pt, epoch 1")


def chromium_path():
    return shutil.which("chromium") or shutil.which("chromium-browser")


FLAG_ALL = QualityModel(  # an estimate of 0.5 for every mask: each one is marked for review
    mean=[0.0] * len(FEATURES),
    scale=[1.0] * len(FEATURES),
    coef=[0.0] * len(FEATURES),
    intercept=0.0,
    knots_x=[-1.0, 1.0],
    knots_y=[0.5, 0.5],
)


class DiscPredictor:
    """A stand-in model for the page test: always a centred disc, so the page has a lesion to draw; its quality
    estimate flags every mask."""

    image_size, threshold, name, version = 32, 0.5, "disc stub (32 px)", "test"
    quality = FLAG_ALL

    def __call__(self, images):
        yy, xx = np.mgrid[:32, :32]
        disc = (((yy - 15.5) ** 2 + (xx - 15.5) ** 2) < 100).astype(np.float32)
        return np.broadcast_to(disc, (len(images), 1, 32, 32)).copy()


def test_the_reply_carries_the_quality_estimate_and_the_review_flag(tiny_checkpoint):
    plain = local_client(create_app(TorchPredictor(tiny_checkpoint)))
    body = plain.post("/predict", files={"file": ("a.jpg", jpeg_bytes(), "image/jpeg")}).json()
    assert body["quality"] is None and body["review"] is None  # a model without an estimate says so
    flagged = local_client(create_app(DiscPredictor()))
    body = flagged.post("/predict", files={"file": ("a.jpg", jpeg_bytes(), "image/jpeg")}).json()
    assert body["quality"] == 0.5 and body["review"] is True


def boxes_overlap(a, b) -> bool:
    return not (
        a["x"] + a["width"] <= b["x"]
        or b["x"] + b["width"] <= a["x"]
        or a["y"] + a["height"] <= b["y"]
        or b["y"] + b["height"] <= a["y"]
    )


def assert_no_overlap(page, selectors):
    boxes = {s: page.locator(s).bounding_box() for s in selectors}
    for i, a in enumerate(selectors):
        for b in selectors[i + 1 :]:
            assert not boxes_overlap(boxes[a], boxes[b]), f"{a} overlaps {b}: {boxes[a]} {boxes[b]}"


GREEN_PIXELS = """canvas => { const d = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i] < 60 && d[i + 1] > 200 && d[i + 2] < 60) n++; return n; }"""


@pytest.fixture
def page_server():
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(DiscPredictor()), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(5)


@pytest.mark.skipif(chromium_path() is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_a_person_segments_images_in_the_page(page_server, tmp_path):
    """Layout from screenshots' bounding boxes, not only the DOM: nothing of the result shows before an upload,
    nothing overlaps, long names wrap; the mask/outline toggle, opacity and download work on several images."""
    from playwright.sync_api import sync_playwright

    shots = Path(os.environ.get("LESIONSEG_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    photo = tmp_path / "lesion.png"
    Image.fromarray(np.full((90, 120, 3), (190, 150, 130), np.uint8)).save(photo)
    long_name = tmp_path / ("ISIC_0000000_a_very_long_file_name_from_a_clinic_export_" * 3 + ".png")
    shutil.copy(photo, long_name)
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium_path(),
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        page = browser.new_page(viewport={"width": 1000, "height": 900})
        page.goto(page_server)
        page.wait_for_function("document.getElementById('model-name').textContent.includes('disc stub')")
        page.screenshot(path=shots / "page-before.png", full_page=True)
        assert not page.locator("#result").is_visible()
        assert page.locator("img").count() == 0  # no broken-image icon anywhere
        assert_no_overlap(page, ["h1", "#model", "#intro", "#drop", "#status", "#error"])

        page.set_input_files("#file", [str(photo), str(long_name)])
        page.wait_for_function("document.querySelectorAll('.result').length === 2")
        page.wait_for_function("document.getElementById('status').textContent.includes('done')")
        page.screenshot(path=shots / "page-after.png", full_page=True)
        assert page.locator("#result").is_visible()
        assert "2 of 2 images done" in page.text_content("#status")
        assert_no_overlap(page, ["h1", "#drop", "#status", "#result"])
        result_box = page.locator("#result").bounding_box()
        heading = page.locator(".result h2").nth(1).bounding_box()
        assert heading["x"] + heading["width"] <= result_box["x"] + result_box["width"] + 1  # the long name wraps
        assert heading["height"] > 30

        first = page.locator(".result").first
        assert first.locator('[data-field="width"]').text_content() == "120"
        assert first.locator(".review").is_visible() and "Check this mask" in first.locator(".review").text_content()
        assert first.locator('[data-field="quality"]').text_content() == "0.50"
        assert_no_overlap(first, [".review", "h2", "canvas", "table.stats"])
        canvas = first.locator("canvas")
        outline = canvas.evaluate(GREEN_PIXELS)
        first.locator("input[value=mask]").check()
        filled = canvas.evaluate(GREEN_PIXELS)
        assert 0 < outline < filled < 120 * 90
        first.locator(".opacity").fill("0")
        assert canvas.evaluate(GREEN_PIXELS) == 0
        link = first.locator("a.download")
        assert link.get_attribute("download") == "lesion_mask.png"
        assert link.get_attribute("href").startswith("data:image/png;base64,")

        page.set_input_files("#file", str(bad))
        page.wait_for_function("document.getElementById('error').textContent.length > 0")
        assert "bad.jpg: not an image" in page.text_content("#error")
        assert_no_overlap(page, ["#drop", "#status", "#error", "#result"])

        tiff = tmp_path / "scan.tif"  # a format the browser cannot draw: the page asks the server for the overlay
        Image.open(photo).save(tiff)
        asked = []
        page.on("request", lambda request: asked.append(request.url))
        page.set_input_files("#file", str(tiff))
        page.wait_for_function("document.querySelectorAll('.result').length === 3")
        assert [url for url in asked if url.endswith("predict?overlay=true")]
        assert page.locator(".result").nth(2).locator("canvas").evaluate(GREEN_PIXELS) > 0
        browser.close()


def test_serve_tta_serves_the_flip_averaged_model(tiny_checkpoint, monkeypatch, capsys):
    """`serve --tta` hands the server the same view-averaged predictor `predict --tta` uses."""
    import lesionseg.segment.serve
    from lesionseg.cli import main
    from lesionseg.segment.pipeline import ViewAveraged

    served = {}
    monkeypatch.setattr(
        lesionseg.segment.serve, "run_serve", lambda predictor, *args: served.update(predictor=predictor)
    )
    main(["serve", "--checkpoint", str(tiny_checkpoint), "--backend", "torch", "--tta"])
    pipeline = served["predictor"]
    assert isinstance(pipeline.predictor, ViewAveraged) and len(pipeline.predictor.views) == 3
    assert isinstance(pipeline.predictor.predictor, TorchPredictor) and pipeline.name == pipeline.predictor.name
    assert "with TorchPredictor, tta" in capsys.readouterr().err
    main(["serve", "--checkpoint", str(tiny_checkpoint), "--backend", "torch", "--largest-component", "--fill-holes"])
    assert served["predictor"].refine.name == "largest_component+fill_holes"
