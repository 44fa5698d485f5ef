"""`lesionseg serve`: POST /predict takes an image, GET / is a page to drop one on."""

from __future__ import annotations

import base64
import io
import time
from importlib import resources

from fastapi import FastAPI, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image

from lesionseg.errors import DataError, ImageTooLargeError, NotAnImageError
from lesionseg.images import decode_image
from lesionseg.prediction import Predictor, mask_image, overlay, png_bytes, segment

MAX_UPLOAD_BYTES = 20 * 1024 * 1024


def decode_upload(data: bytes, name: str) -> Image.Image:
    """RGB image from uploaded bytes under the policy every path shares (`images.decode_image`), or an HTTP 4xx
    that says what is wrong with the file: 413 too many pixels, 415 not an image, 400 corrupt."""
    if not data:
        raise HTTPException(400, f"{name}: empty upload")
    try:
        return decode_image(io.BytesIO(data), name)[0]
    except ImageTooLargeError as exc:
        raise HTTPException(413, str(exc)) from None
    except NotAnImageError as exc:
        raise HTTPException(415, str(exc)) from None
    except DataError as exc:
        raise HTTPException(400, str(exc)) from None


def create_app(predictor: Predictor, max_upload_bytes: int = MAX_UPLOAD_BYTES) -> FastAPI:
    app = FastAPI(title="lesionseg", description="Skin-lesion segmentation of dermoscopy images")
    page = resources.files("lesionseg").joinpath("static", "index.html").read_text()

    @app.middleware("http")
    async def refuse_oversized(request: Request, call_next):
        """Refuse on the declared length, before the multipart body is spooled to disk."""
        if int(request.headers.get("content-length") or 0) > max_upload_bytes + 64 * 1024:
            return JSONResponse({"detail": f"upload larger than the {max_upload_bytes // 2**20} MiB limit"}, status_code=413)
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "image_size": predictor.image_size, "model": predictor.name, "version": predictor.version}

    @app.post("/predict")
    def predict(file: UploadFile) -> dict:
        """The JSON row of the image, with its mask and overlay as base64 PNG (run in the thread pool,
        so a long prediction does not hold up other requests)."""
        name = file.filename or "upload"
        data = file.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"{name}: larger than the {max_upload_bytes // 2**20} MiB upload limit")
        image = decode_upload(data, name)
        start = time.perf_counter()
        result = segment(predictor, [image], [name])[0]
        return {
            **result.stats,
            "model": predictor.name,
            "version": predictor.version,
            "seconds": time.perf_counter() - start,
            "mask_png": base64.b64encode(png_bytes(mask_image(result.mask))).decode(),
            "overlay_png": base64.b64encode(png_bytes(overlay(image, result.mask))).decode(),
        }

    return app


def run_serve(predictor: Predictor, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    uvicorn.run(create_app(predictor), host=host, port=port)
