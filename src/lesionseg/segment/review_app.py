"""The review page's service: a FastAPI app over one `ReviewFolder`, on loopback unless told otherwise."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, Response

from lesionseg.errors import LesionsegError
from lesionseg.files import shown
from lesionseg.segment.clicks import Clicker, parsed_points
from lesionseg.segment.encoders import mask_png_8bit, probability_image
from lesionseg.segment.guard import LocalOnly, allowed_hosts
from lesionseg.segment.pages import page_text, serve_shared_script
from lesionseg.segment.pipeline import FIXED_POINT, Pipeline, model_input, read_for_model, to_own_size
from lesionseg.segment.review import MAX_MASK_BYTES, Item, ReviewFolder, holding, refined

NO_CACHE = {"Cache-Control": "no-store"}  # a saved correction must show at once, never a cached model mask


def recomputer(pipeline: Pipeline) -> Callable[[Path], np.ndarray]:
    """The probability map of an image at its own size as 8-bit grey, for folders predict wrote without
    --probabilities (the released model, or the one given to `review`)."""

    def recompute(path: Path) -> np.ndarray:
        image, size, _ = read_for_model(path, shown(path), pipeline.image_size)
        probability = pipeline.probabilities(model_input(image, pipeline.image_size)[None])[0, 0]
        return np.asarray(probability_image(pipeline.result(probability, size, assessed=False)))

    return recompute


def create_review_app(
    folder: ReviewFolder,
    recompute: Callable[[Path], np.ndarray],
    threshold: float,
    hosts: frozenset[str] = allowed_hosts("127.0.0.1"),
    notes: list[str] = (),
    clicker: Clicker | None = None,
) -> FastAPI:
    """The page and its API behind the door of `guard.py`: only our own names, only our own page writes."""
    app = FastAPI(title="lesionseg review", description="Review and correct a predict folder's masks")
    app.add_middleware(LocalOnly, hosts=hosts)
    page = page_text("review.html")
    serve_shared_script(app)

    def item(index: int):
        try:
            return folder.item(index)
        except LesionsegError as exc:
            raise HTTPException(404, str(exc)) from None

    def answer(call):
        """A bad image, mask or request is a 400 with the one-line reason, never a traceback."""
        try:
            return call()
        except LesionsegError as exc:
            raise HTTPException(400, str(exc)) from None

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/items")
    def items(offset: int = 0, limit: int = 50) -> dict:
        return folder.page(offset, limit) | {"threshold": threshold, "notes": list(notes), "next": next_steps(folder)}

    @app.get("/api/image/{index}")
    def image(index: int) -> Response:
        return Response(answer(lambda: folder.image_jpeg(item(index))), media_type="image/jpeg", headers=NO_CACHE)

    @app.get("/api/mask/{index}")
    def mask(index: int) -> Response:
        return Response(answer(lambda: folder.mask_png(item(index))), media_type="image/png", headers=NO_CACHE)

    @app.get("/api/probability/{index}")
    def probability(index: int) -> Response:
        data = answer(lambda: folder.probability_png(item(index), recompute))
        return Response(data, media_type="image/png", headers=NO_CACHE)

    async def body(request: Request) -> bytes:
        """A mask the page posts: declared as a PNG (a cross-site page cannot declare it without a preflight)."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "image/png":
            raise HTTPException(415, f"a mask is sent as image/png, not {kind[:60] or 'an undeclared type'}")
        data = b""
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_MASK_BYTES:
                raise HTTPException(413, f"a mask is at most {MAX_MASK_BYTES:,} bytes")
        return data

    @app.post("/api/save/{index}")
    async def save(index: int, request: Request) -> dict:
        data, chosen = await body(request), item(index)
        return answer(lambda: folder.save(chosen, folder.checked_mask(chosen, data), "corrected"))

    @app.post("/api/accept/{index}")
    def accept(index: int) -> dict:
        return answer(lambda: folder.accept(item(index)))

    @app.post("/api/lesion/{index}")
    async def lesion(index: int, request: Request) -> dict:
        """The descriptors and drawing of the page's current mask (image/png), nothing saved."""
        data, chosen = await body(request), item(index)
        return answer(lambda: folder.lesion(chosen, folder.checked_mask(chosen, data)))

    tools = page_tools(folder, clicker)

    @app.get("/api/tools")
    def tool_list() -> dict:
        """What each tool takes, so the page (or another client) knows how to call it."""
        return {name: tool.takes for name, tool in tools.items()}

    @app.post("/api/tool/{name}/{index}")
    async def use_tool(name: str, index: int, request: Request, positive: str = "", negative: str = "") -> Response:
        """The page's current mask (image/png) through one tool; the tool's mask back, nothing saved."""
        if name not in tools:
            raise HTTPException(404, f"no tool {name[:40]!r}; the tools are {', '.join(tools)}")
        data, chosen = await body(request), item(index)
        changed = answer(lambda: tools[name].run(chosen, folder.checked_mask(chosen, data), positive, negative))
        return Response(mask_png_8bit(changed), media_type="image/png", headers=NO_CACHE)

    return app


@dataclass(frozen=True)
class Tool:
    """One way of changing the page's mask on the server: what it takes, and the change. A new tool is one entry of
    `page_tools` and one button on the page."""

    takes: str  # "mask", or "mask and clicks"
    run: Callable[[Item, np.ndarray, str, str], np.ndarray]  # (item, mask, positive, negative) -> mask


def page_tools(folder: ReviewFolder, clicker: Clicker | None) -> dict[str, Tool]:
    """The clean-ups (the pipeline's own refinements) and clicks (the click model, where one is installed)."""
    tools = {
        "fill_holes": Tool("mask", lambda item, mask, *_: refined(mask, "fill_holes")),
        "largest": Tool("mask", lambda item, mask, *_: refined(mask, "largest")),
    }
    clicker = clicker or Clicker()

    def click(item: Item, mask: np.ndarray, positive: str, negative: str) -> np.ndarray:
        points = parsed_points(positive, "positive"), parsed_points(negative, "negative")
        probability, own = clicker.probability(folder.image_path(item), *points, mask)
        return to_own_size(probability, *own) >= clicker.model.threshold * FIXED_POINT

    tools["click"] = Tool("mask and clicks", click)
    return tools


def run_review(out, images, pipeline: Pipeline, host: str = "127.0.0.1", port: int = 8001) -> None:
    import uvicorn

    folder = ReviewFolder(out, images)
    with holding(folder):  # a refused folder says why before anything says "reviewing"
        notes = startup_notes(folder, pipeline)
        app = create_review_app(folder, recomputer(pipeline), pipeline.threshold, allowed_hosts(host), notes)
        print(f"lesionseg: reviewing {shown(folder.out)} at http://{host}:{port}/", file=sys.stderr)
        for note in notes:
            print(f"lesionseg: {note}", file=sys.stderr)
        uvicorn.run(app, host=host, port=port, log_level="warning")


def startup_notes(folder: ReviewFolder, pipeline: Pipeline) -> list[str]:
    """What the reviewer should know before trusting the page: rows it cannot show, and a page model (its
    threshold slider, its recomputed maps) that is not the model that made the folder's masks."""
    notes = []
    if folder.unreadable:
        notes.append(f"{folder.unreadable} row(s) of {shown(folder.out)} name no file or mask and are not shown")
    made_by = {item.row.get("model_sha256") for item in folder.items} - {None}
    if made_by and made_by != {pipeline.sha256}:
        notes.append(
            f"the masks were made by another model than the page's ({pipeline.name}): its threshold slider and "
            "recomputed maps are that model's; pass the folder's model with --onnx or --checkpoint"
        )
    return notes


def next_steps(folder: ReviewFolder) -> list[str]:
    """The two commands that close the loop: adapt to the saved masks, then segment the folder's images again with
    the adapted model into a new folder (this one, and its review/, stay as they are)."""
    inputs = sorted({str(Path(item.row["file"]).parent) for item in folder.items})
    out = shown(folder.out).rstrip("/")
    return [
        f"lesionseg adapt --data {shlex.quote(out + '/review')} --out {shlex.quote(out + '-adapt')}",
        f"lesionseg predict {' '.join(shlex.quote(i) for i in inputs[:3])}{' …' if len(inputs) > 3 else ''} "
        f"--onnx {shlex.quote(out + '-adapt/model.onnx')} --out {shlex.quote(out + '-adapted')} --probabilities",
    ]
