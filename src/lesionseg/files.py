"""Small file helpers every module shares: a content hash, and writes that never leave half a file."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import select
import signal
import socket
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from lesionseg.errors import LesionsegError

try:  # POSIX; where it is missing (Windows) runs are not locked against each other
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None


def current_umask() -> int:
    """The process's umask (read once, at import: reading it means setting it, which is not thread-safe)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~current_umask()  # what open() gives a new file: 0644 under the usual umask 022


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
            if hasattr(os, "fchmod"):  # a temp file is born 0600; the result is shared like any file the user makes
                os.fchmod(handle.fileno(), FILE_MODE)
            write(handle)
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise LesionsegError(
            f"{path}: {what} not written ({exc.strerror or exc}); the previous one is intact"
        ) from None
    return path


def shown(path: str | os.PathLike) -> str:
    """A path as text that can always be printed and written to CSV: bytes that are not UTF-8 (a name from
    another system's encoding) become U+FFFD instead of an encoding error halfway through a run."""
    return os.fsencode(path).decode("utf-8", "replace")


def unusable(path: Path) -> str | None:
    """Why `path` cannot be read as a file (None: it can), in words a user recognises."""
    if path.is_symlink() and not path.exists():
        try:
            path.stat()
        except OSError as exc:
            return "a symbolic link that loops" if exc.errno == errno.ELOOP else "a broken symbolic link"
    if not path.exists():
        return "no such file or folder"
    if not path.is_file():
        return "not a regular file (a FIFO, socket or device)"
    return None


def bounded(check: Callable[[], str | None], limit_bytes: int, timeout_s: float = 300) -> str | None:
    """`check()` (None, or what is wrong) run in a forked child whose address space may grow by at most
    `limit_bytes`: a file crafted to allocate gigabytes fails there, as one line, and this process never grows.
    Where there is no fork (or no /proc), `check` runs here, unbounded."""
    status = Path("/proc/self/status")
    if not hasattr(os, "fork") or not status.is_file():
        return check()
    import resource  # POSIX only, as fork is

    virtual = int(re.search(r"VmSize:\s+(\d+) kB", status.read_text()).group(1)) * 1024
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork beside threads: the child only runs `check`
        pid = os.fork()
    if pid == 0:  # the child: never returns
        try:
            os.close(read_end)
            resource.setrlimit(resource.RLIMIT_AS, (virtual + limit_bytes, resource.getrlimit(resource.RLIMIT_AS)[1]))
            message = check() or ""
        except BaseException as exc:  # noqa: BLE001 - whatever it is, the parent reports it in one line
            too_big = isinstance(exc, MemoryError) or "allocate" in str(exc)
            message = (
                f"needs more than {limit_bytes / 2**30:.1f} GiB of memory to load and run once"
                if too_big
                else f"cannot be used ({exc.__class__.__name__}: {str(exc)[:200]})"
            )
        os.write(write_end, (message or "\0").encode()[:4096])
        os._exit(0)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], timeout_s)
        data = os.read(read_end, 4096) if ready else None
    finally:
        os.close(read_end)
    if data is None:
        os.kill(pid, signal.SIGKILL)
    _, code = os.waitpid(pid, 0)
    if data is None:
        return f"did not load and run once within {timeout_s:.0f} s"
    if not data:  # killed or aborted before it could answer: an allocation the bound refused
        return f"needs more than {limit_bytes / 2**30:.1f} GiB of memory to load and run once (status {code})"
    text = data.decode(errors="replace")
    return None if text == "\0" else text


def same_stem(paths: list[Path]) -> tuple[Path, Path] | None:
    """The first two files that share a stem (a.jpg and a.png), which one id cannot tell apart; None if none do."""
    first: dict[str, Path] = {}
    for path in paths:
        stem = shown(path.stem)
        if stem in first:
            return first[stem], path
        first[stem] = path
    return None


def output_folder(path: str | os.PathLike, what: str = "output folder") -> Path:
    """`path` created if needed and checked writable, before any work: one line naming it if it cannot be."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LesionsegError(f"{shown(path)}: {what} is an existing file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LesionsegError(f"{shown(path)}: cannot create the {what} ({exc.strerror or exc})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise LesionsegError(f"{shown(path)}: the {what} is not writable")
    return path


def claim_output_folder(
    folder: str | os.PathLike, record: str, keys: set[str], others: tuple[str, ...], command: str
) -> Path:
    """A folder `command` writes `record` (a JSON object with `keys`) and `others` into, created and checked
    before any work: where those files exist but no earlier run of `command` wrote them, refused."""
    folder = output_folder(folder)
    path = folder / record
    if path.exists():
        try:
            ours = keys <= set(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            ours = False
        foreign = [] if ours else [path]
    else:
        foreign = [folder / name for name in others if (folder / name).exists()]
    if foreign:
        raise LesionsegError(
            f"{shown(foreign[0])}: exists and was not written by lesionseg {command}; choose another --out"
        )
    return folder


def remove_stale_temps(folder: Path, name: str) -> None:
    """Temp files a killed `write_atomically` of `folder/name` left behind."""
    for stale in folder.glob(f".{name}.*.tmp"):
        stale.unlink(missing_ok=True)


@contextmanager
def locked(path: Path, what: str, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if needed, never deleted: deleting a lock file races). Not
    waiting, a lock another process holds is one line naming that process; the lock ends with the process, so
    a killed run never leaves a folder locked."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    try:
        handle = open(path, "a+")
    except OSError as exc:
        raise LesionsegError(f"{shown(path)}: cannot create the lock file ({exc.strerror or exc})") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read(200).strip() or "another process"
            raise LesionsegError(f"{shown(path.parent)}: {what} is in use by {holder}; wait for it to finish") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"lesionseg (pid {os.getpid()} on {socket.gethostname()})")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def held_by_another(path: Path) -> bool:
    """Whether a live process holds the lock on `path` (a lock file whose process ended is free)."""
    if fcntl is None or not path.exists():  # pragma: no cover
        return False
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False
