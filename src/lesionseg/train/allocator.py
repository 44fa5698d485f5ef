"""A caching memory allocator for training, without the user having to know: PyTorch's CPU training frees and
allocates the same large activation buffers every step, which glibc's malloc returns to the system and zeroes again;
tcmalloc keeps them. Training re-executes itself once with the library preloaded when it is installed and not yet
loaded, as PyTorch's own CPU launcher (`torch.backends.xeon.run_cpu`) does. `LESIONSEG_ALLOCATOR=system` opts out.
No PyTorch here: the decision is made before PyTorch is imported.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV = "LESIONSEG_ALLOCATOR"  # "auto" (default): tcmalloc if installed; "system": glibc's malloc; or a library path
LIBRARIES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")  # chosen by measurement: benchmarks/README.md, "Allocator"
SEARCH = (
    "/usr/lib/x86_64-linux-gnu",
    "/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
REEXECUTED = "_LESIONSEG_ALLOCATOR_REEXECUTED"  # set in the child, so a failed preload never loops


def find_library() -> Path | None:
    """The allocator to preload: $LESIONSEG_ALLOCATOR's path, else the first of LIBRARIES installed."""
    choice = os.environ.get(ENV, "auto")
    if choice == "system":
        return None
    if choice != "auto":
        return Path(choice) if Path(choice).is_file() else None
    folders = [Path(p) for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p] + [Path(p) for p in SEARCH]
    return next((folder / name for name in LIBRARIES for folder in folders if (folder / name).is_file()), None)


def loaded() -> str | None:
    """The caching allocator mapped into this process, if any (tcmalloc or jemalloc)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for name in ("tcmalloc", "jemalloc"):
        for line in maps.splitlines():
            if name in line and ".so" in line:
                return line.split()[-1]
    return None


def describe() -> str:
    return loaded() or "glibc malloc"


def ensure_caching_allocator() -> None:
    """Re-execute this command once with the allocator in LD_PRELOAD; a missing library is a one-line note."""
    if loaded() or os.environ.get(REEXECUTED) or not sys.platform.startswith("linux"):
        return
    library = find_library()
    if library is None:
        if os.environ.get(ENV, "auto") != "system":
            print(
                f"lesionseg: note: training with glibc's malloc; installing tcmalloc (Debian/Ubuntu: apt install "
                f"libtcmalloc-minimal4) trains faster; {ENV}=system silences this",
                file=sys.stderr,
            )
        return
    env = dict(os.environ, **{REEXECUTED: "1"})
    env["LD_PRELOAD"] = ":".join(p for p in (str(library), env.get("LD_PRELOAD", "")) if p)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def return_freed_memory_promptly() -> None:
    """For the service, which lives on after images up to 60 MP: glibc raises its mmap threshold each time a
    large block is freed, after which blocks that large come from its heaps and stay there once freed; a service
    that answered a few such images kept GBs it no longer used. A fixed threshold keeps every array over 1 MiB a
    mapping of its own, returned to the system when it is freed."""
    set_malloc_thresholds(mmap=1 << 20)


def bound_memory_and_reuse_it() -> None:
    """For predict, which goes through many ordinary photos and maybe a few at the pixel limit: arrays over
    8 MiB (Pillow's 16 MiB blocks of a large image among them) are mappings returned when freed, so the peak
    stays bounded; smaller ones, an ordinary photo's full-size arrays, are reused from the heap instead of the
    kernel zeroing fresh pages for each image (1 MiB cost 13 ms of system time per 1.7 MP image; glibc's own
    rising threshold doubled the peak on 60 MP images: benchmarks/README.md, "predict end to end")."""
    set_malloc_thresholds(mmap=8 << 20, trim=64 << 20)


def set_malloc_thresholds(mmap: int, trim: int | None = None) -> None:
    """glibc's fixed thresholds (not glibc, or not Linux: nothing to do)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, mmap)
        if trim is not None:
            libc.mallopt(M_TRIM_THRESHOLD, trim)
    except (OSError, AttributeError):
        pass
