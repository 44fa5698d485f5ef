"""`lesionseg download isic2016`: fetch, resume, verify, extract and count the official archives."""

from __future__ import annotations

import http.client
import os
import shutil
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from lesionseg.errors import LesionsegError
from lesionseg.files import sha256_of
from lesionseg.images import IMAGE_SUFFIXES

CHUNK = 1 << 16
MAX_INFLATION = 4  # JPEG and PNG hardly compress: a zip of them that inflates more is not what it claims


@dataclass(frozen=True)
class Archive:
    """One zip: where it is, what it must be (size and SHA-256 where recorded), what it must hold."""

    url: str
    folder: str  # the folder the zip extracts to
    files: int  # image or mask files inside
    size: int | None = None
    sha256: str | None = None

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


ISIC_2016_BASE = "https://isic-challenge-data.s3.amazonaws.com/2016/"
# The checksums of the official archives could not be recorded on the machines this was written on
# (no internet); until they are, downloads are checked by zip integrity and file counts, and the
# measured size and SHA-256 are printed so they can be recorded here.
DATASETS: dict[str, tuple[Archive, ...]] = {
    "isic2016": tuple(
        Archive(ISIC_2016_BASE + f"{folder}.zip", folder, count)
        for folder, count in (
            ("ISBI2016_ISIC_Part1_Training_Data", 900),
            ("ISBI2016_ISIC_Part1_Training_GroundTruth", 900),
            ("ISBI2016_ISIC_Part1_Test_Data", 379),
            ("ISBI2016_ISIC_Part1_Test_GroundTruth", 379),
        )
    ),
}


class DownloadError(LesionsegError):
    """A download that failed or did not verify; the message names the file."""


def fetch(url: str, part: Path, progress: bool, timeout: float = 60) -> None:
    """Append the rest of `url` to `part`, asking the server for the bytes not yet there (HTTP Range)."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416:  # nothing left to send: the part file is already whole
            return
        raise
    with response:
        if have and response.status != 206:  # the server ignored Range: start over
            have = 0
        total = response.length + have if response.length is not None else None
        with (
            open(part, "ab" if have else "wb") as handle,
            tqdm(
                total=total,
                initial=have,
                unit="B",
                unit_scale=True,
                desc=part.name.removesuffix(".part"),
                disable=not progress,
            ) as bar,
        ):
            while block := response.read(CHUNK):
                handle.write(block)
                bar.update(len(block))
        if total is not None and part.stat().st_size < total:
            raise http.client.IncompleteRead(b"", total - part.stat().st_size)


def download_archive(archive: Archive, dest: Path, progress: bool = True, attempts: int = 5) -> Path:
    """The verified zip in `dest`, resuming a partial `.part` file over dropped connections."""
    target = dest / archive.filename
    if target.is_file():
        verify(archive, target)
        return target
    part = dest / f"{archive.filename}.part"
    for attempt in range(1, attempts + 1):
        try:
            fetch(archive.url, part, progress)
            break
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, OSError) as exc:
            if attempt == attempts:
                raise DownloadError(
                    f"{archive.url}: download failed after {attempts} attempts ({exc}); run again to resume from {part}"
                ) from None
            time.sleep(min(2**attempt * 0.1, 5))
    try:
        verify(archive, part)
    except DownloadError:
        part.unlink()  # a wrong file cannot be resumed into a right one
        raise
    os.replace(part, target)
    return target


def verify(archive: Archive, path: Path) -> None:
    size = path.stat().st_size
    if archive.size is not None and size != archive.size:
        raise DownloadError(f"{path}: {size} bytes, expected {archive.size}")
    digest = sha256_of(path)
    if archive.sha256 is not None and digest != archive.sha256:
        raise DownloadError(f"{path}: SHA-256 {digest} does not match the recorded {archive.sha256}")
    if archive.sha256 is None:
        print(f"lesionseg: {path.name}: no checksum recorded; measured size {size}, sha256 {digest}")


def extract(archive: Archive, zip_path: Path, dest: Path) -> Path:
    """Unzip into a temporary folder, count the files, then move the folder into place. A folder of that name
    that does not hold the archive's images is someone's own: it is never replaced or deleted."""
    folder = dest / archive.folder
    if folder.is_dir() and count_files(folder) == archive.files:
        return folder
    if folder.exists():
        raise DownloadError(
            f"{folder}: exists and does not hold the {archive.files} images of {zip_path.name}; "
            "not replaced: move it away or choose another destination"
        )
    staging = dest / f".{archive.folder}.extracting"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        inflate(archive, zip_path, staging, dest)
        inner = staging / archive.folder if (staging / archive.folder).is_dir() else staging
        found = count_files(inner)
        if found != archive.files:
            raise DownloadError(f"{zip_path}: holds {found} files, expected {archive.files}")
        os.replace(inner, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def inflate(archive: Archive, zip_path: Path, staging: Path, dest: Path) -> None:
    """Every member into `staging`; a damaged archive or a full disk is one line naming the archive."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            check_contents(archive, zip_path, zf.infolist(), dest)
            zf.extractall(staging)  # each member's CRC is checked as it is inflated, once
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
        raise DownloadError(f"{zip_path}: not a valid zip ({exc.__class__.__name__}: {str(exc)[:120]})") from None
    except OSError as exc:  # a full disk, most likely: nothing half-extracted is left behind
        raise DownloadError(f"{zip_path}: not extracted ({exc.strerror or exc}); nothing was left in {dest}") from None


def check_contents(archive: Archive, zip_path: Path, members: list[zipfile.ZipInfo], dest: Path) -> None:
    """From the zip's directory alone, before anything is inflated: the expected number of images, contents that
    images (which do not compress) could be, and room on the disk for them."""
    images = sum(1 for m in members if not m.is_dir() and Path(m.filename).suffix.lower() in IMAGE_SUFFIXES)
    if images != archive.files:
        raise DownloadError(f"{zip_path}: lists {images} image files, expected {archive.files}; not extracted")
    declared = sum(m.file_size for m in members)
    packed = zip_path.stat().st_size
    if declared > MAX_INFLATION * packed + 2**20:
        raise DownloadError(
            f"{zip_path}: declares {declared:,} bytes inflated from {packed:,} ({declared / packed:.0f}x): "
            "not images; not extracted"
        )
    free = shutil.disk_usage(dest).free
    if declared > free:
        raise DownloadError(f"{dest}: {free:,} bytes free, {zip_path.name} needs {declared:,}; not extracted")


def count_files(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def run_download(
    dataset: str, dest: str | os.PathLike, progress: bool = True, archives: tuple[Archive, ...] | None = None
) -> Path:
    """Download, verify and extract every archive of `dataset` into `dest` (ready for --data)."""
    if archives is None:
        if dataset not in DATASETS:
            raise LesionsegError(f"unknown dataset {dataset!r}; choose from: {', '.join(DATASETS)}")
        archives = DATASETS[dataset]
    dest = Path(dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"{dest}: cannot create ({exc.strerror or exc})") from None
    for archive in archives:
        extract(archive, download_archive(archive, dest, progress), dest)
    return dest
