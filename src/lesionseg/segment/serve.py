"""`lesionseg serve`: POST /predict takes an image, GET / is a page to drop one on.

Where the time goes decides the design (benchmarks/README.md, "Service"): a request spends far longer
decoding, resizing and encoding PNGs than in the model. So an upload is decoded only as large as the model
needs (JPEG DCT scaling), the reply carries the mask alone (the page draws the outline itself; the overlay
is opt-in), and the model runs in one thread that batches the requests in flight, instead of every
request thread running its own model call on the same two cores.
"""

from __future__ import annotations

import asyncio
import base64
import io
import queue
import threading
import time
from concurrent.futures import Future
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI, HTTPException, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image

from lesionseg.errors import DataError, ImageTooLargeError, NotAnImageError
from lesionseg.files import shown
from lesionseg.images import MAX_PIXELS, PixelBudget, decode_image, open_checked
from lesionseg.segment.descriptors import measure, picture_of
from lesionseg.segment.encoders import mask_png, png_bytes
from lesionseg.segment.encoders import overlay as outlined
from lesionseg.segment.guard import LocalOnly, allowed_hosts
from lesionseg.segment.pages import page_text, serve_shared_script
from lesionseg.segment.pipeline import Pipeline, Predictor, model_input, read_for_model
from lesionseg.segment.predictors import MAX_NAME

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MULTIPART_OVERHEAD = 64 * 1024  # the form's boundaries and headers around the file
UPLOAD_TIMEOUT_S = 60.0  # 20 MiB in a minute: about 2.8 Mbit/s


class ServerBusy(Exception):
    """More requests are waiting for the model than the queue holds."""


class MicroBatcher:
    """The Predictor protocol for many request threads: images submitted while the model is busy, or within
    `window_s` of the first, run together as one batch of at most `max_batch`, one model call at a time."""

    def __init__(
        self, predictor: Predictor, max_batch: int = 16, window_s: float = 0.002, max_waiting: int = 256
    ) -> None:
        self.predictor, self.max_batch, self.window_s = predictor, max_batch, window_s
        self.image_size, self.threshold = predictor.image_size, predictor.threshold
        self.name, self.version = predictor.name, predictor.version
        self.batch_sizes: list[int] = []  # one entry per model call, for tests and benchmarks
        self.waiting: queue.Queue = queue.Queue(max_waiting)
        self.worker = threading.Thread(target=self.run, name="lesionseg-batcher", daemon=True)
        self.worker.start()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        futures = [self.submit(image) for image in images]
        return np.stack([future.result() for future in futures])

    def submit(self, image: np.ndarray) -> Future:
        future: Future = Future()
        try:
            self.waiting.put_nowait((image, future))
        except queue.Full:
            raise ServerBusy(f"{self.waiting.maxsize} images already wait for the model") from None
        return future

    def next_batch(self) -> list[tuple[np.ndarray, Future]] | None:
        """What is queued now, plus what arrives within the window, up to max_batch; None to stop."""
        first = self.waiting.get()
        if first is None:
            return None
        batch, deadline = [first], time.perf_counter() + self.window_s
        while len(batch) < self.max_batch:
            try:
                item = self.waiting.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                break
            if item is None:  # stop after this batch
                self.waiting.put(None)
                break
            batch.append(item)
        return batch

    def run(self) -> None:
        while (batch := self.next_batch()) is not None:
            try:
                probabilities = self.predictor(np.stack([image for image, _ in batch]))
            except Exception as exc:  # every waiting request gets the model's error, the worker lives on
                for _, future in batch:
                    future.set_exception(exc)
                continue
            self.batch_sizes.append(len(batch))
            for (_, future), probability in zip(batch, probabilities):
                future.set_result(probability)

    def close(self) -> None:
        self.waiting.put(None)
        self.worker.join(10)


def decode_upload(data: bytes, name: str, model_size: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """RGB image from uploaded bytes under the policy every path shares (`images`), reduced as the pipeline
    reduces it for a model of `model_size` px (None: at full size, for an overlay), and its full size; or an
    HTTP 4xx that says what is wrong with the file: 413 too many pixels, 415 not an image, 400 corrupt."""
    if not data:
        raise HTTPException(400, f"{name}: empty upload")
    try:
        if model_size:
            return read_for_model(io.BytesIO(data), name, model_size)[:2]
        image = decode_image(io.BytesIO(data), name)[0]
        return image, image.size
    except ImageTooLargeError as exc:
        raise HTTPException(413, str(exc)) from None
    except NotAnImageError as exc:
        raise HTTPException(415, str(exc)) from None
    except DataError as exc:
        raise HTTPException(400, str(exc)) from None


def upload_pixels(data: bytes, name: str) -> int:
    """The pixel count an upload's header claims (nothing decoded); 1 if it has none: decoding will say why."""
    try:
        with open_checked(io.BytesIO(data), name) as image:
            return image.size[0] * image.size[1]
    except DataError:
        return 1


def as_base64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class BoundedUpload:
    """Request bodies within `max_bytes` and `seconds`, checked as they stream in: a declared length over the
    limit is refused before a byte is read, a chunked body as soon as it passes the limit (not after it was read
    and spooled to disk), and a body not complete `seconds` after the request began gets 408, so a client that
    sends a byte a minute cannot hold a worker for ever. The refusals raise HTTPException, which FastAPI turns
    into the same JSON `detail` as every other error."""

    def __init__(self, app, max_bytes: int, seconds: float) -> None:
        self.app, self.max_bytes, self.seconds = app, max_bytes, seconds

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = f"upload larger than the {self.max_bytes // 2**20} MiB limit"
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            return await JSONResponse({"detail": limit}, status_code=413)(scope, receive, send)
        deadline, received, body_done = time.monotonic() + self.seconds, 0, False

        async def bounded_receive():
            nonlocal body_done, received
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise HTTPException(408, f"upload not complete within {self.seconds:g} s") from None
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, limit)
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, bounded_receive, send)


def create_app(
    pipeline: Pipeline | Predictor,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    max_batch: int = 16,
    batch_window_s: float = 0.002,
    upload_timeout_s: float = UPLOAD_TIMEOUT_S,
    hosts: frozenset[str] = allowed_hosts("127.0.0.1"),
) -> FastAPI:
    """The app for a pipeline (its views and refinements), or for a bare predictor with none."""
    if not isinstance(pipeline, Pipeline):
        pipeline = Pipeline(pipeline)
    batcher = MicroBatcher(pipeline.predictor, max_batch, batch_window_s)  # views run inside one batched call
    batched = Pipeline(batcher, pipeline.refine, views_inside=True, quality=pipeline.quality)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        batcher.close()

    app = FastAPI(
        title="lesionseg",
        description="Skin-lesion segmentation of dermoscopy images",
        lifespan=lifespan,
    )
    app.add_middleware(BoundedUpload, max_bytes=max_upload_bytes + MULTIPART_OVERHEAD, seconds=upload_timeout_s)
    app.add_middleware(LocalOnly, hosts=hosts)  # added last, so it runs first
    app.state.batcher = batcher
    page = page_text("index.html")
    serve_shared_script(app)
    full_size = PixelBudget(MAX_PIXELS)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "image_size": pipeline.image_size, "model": pipeline.name, "version": pipeline.version}

    @app.post("/predict")
    def predict(file: UploadFile, overlay: bool = False) -> dict:
        """The JSON row of the image and its mask as a base64 1-bit PNG at the image's own size; with
        `?overlay=true` also `overlay_png`, the image with the outline drawn (full decode, several times slower).
        Runs in the thread pool; the model call itself is batched with the other requests in flight."""
        name = shown(file.filename or "upload")[:MAX_NAME]
        data = file.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"{name}: larger than the {max_upload_bytes // 2**20} MiB upload limit")
        start = time.perf_counter()
        with full_size.hold(upload_pixels(data, name)):  # however many requests are in flight
            image, size = decode_upload(data, name, pipeline.image_size)
            pixels, picture = model_input(image, pipeline.image_size), picture_of(image)
            del image
        try:
            probability = batched.probabilities(pixels[None])[0, 0]
        except ServerBusy as exc:
            raise HTTPException(503, f"{name}: server busy ({exc}); retry later") from None
        with full_size.hold(size[0] * size[1]):
            result = batched.result(probability, size, name)
            lesion = measure(picture, result.mask)
            reply = {
                **result.stats,
                "descriptors": lesion.columns,
                "drawing": lesion.drawing(),
                "model": pipeline.name,
                "version": pipeline.version,
                "mask_png": as_base64(mask_png(result.mask)),
            }
            if overlay:
                reply["overlay_png"] = as_base64(png_bytes(outlined(decode_upload(data, name)[0], result.mask)))
            del result
        return {**reply, "seconds": time.perf_counter() - start}

    return app


def run_serve(
    predictor: Pipeline | Predictor,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 16,
    batch_window_ms: float = 2.0,
) -> None:
    import uvicorn

    app = create_app(predictor, max_batch=max_batch, batch_window_s=batch_window_ms / 1000, hosts=allowed_hosts(host))
    uvicorn.run(app, host=host, port=port)
