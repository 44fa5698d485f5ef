"""Small file helpers every module shares: a content hash, and writes that never leave half a file."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from lesionseg.errors import LesionsegError


def sha256_of(path: str | os.PathLike) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_atomically(path: Path, write: Callable[[BinaryIO], None], what: str = "file") -> Path:
    """`write(handle)` into a temp file beside `path`, then rename: a crash, a kill or a full disk never
    leaves a half-written `path`, and whatever was there before stays intact until the rename."""
    tmp = None
    try:
        with tempfile.NamedTemporaryFile(
            dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
        ) as handle:
            tmp = Path(handle.name)
            write(handle)
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise LesionsegError(
            f"{path}: {what} not written ({exc.strerror or exc}); the previous one is intact"
        ) from None
    return path


def remove_stale_temps(folder: Path, name: str) -> None:
    """Temp files a killed `write_atomically` of `folder/name` left behind."""
    for stale in folder.glob(f".{name}.*.tmp"):
        stale.unlink(missing_ok=True)
