"""The pages' own files, read from the package: each app serves its page and the script both pages share."""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response

SHARED_SCRIPT = "lesion.js"  # the lesion's table rows and its drawing (axes, colour regions), on both pages


def page_text(name: str) -> str:
    return resources.files("lesionseg.segment").joinpath("static", name).read_text()


def serve_shared_script(app: FastAPI) -> None:
    """GET /lesion.js: the one script file an app serves besides its page, as JavaScript."""
    script = page_text(SHARED_SCRIPT)

    @app.get(f"/{SHARED_SCRIPT}")
    def shared_script() -> Response:
        return Response(script, media_type="text/javascript; charset=utf-8")
