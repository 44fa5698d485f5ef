"""`download` against a local HTTP server that serves small stand-in archives and misbehaves on request."""

import hashlib
import io
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lesionseg.train.data import find_pairs
from lesionseg.train.download import DATASETS, Archive, DownloadError, run_download

FOLDERS = {
    "ISBI2016_ISIC_Part1_Training_Data": ("ISIC_{}.jpg", 3),
    "ISBI2016_ISIC_Part1_Training_GroundTruth": ("ISIC_{}_Segmentation.png", 3),
    "ISBI2016_ISIC_Part1_Test_Data": ("ISIC_{}.jpg", 2),
    "ISBI2016_ISIC_Part1_Test_GroundTruth": ("ISIC_{}_Segmentation.png", 2),
}


def stand_in_zip(folder: str) -> bytes:
    pattern, count = FOLDERS[folder]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for n in range(count):
            zf.writestr(f"{folder}/{pattern.format(n)}", bytes(range(256)) * 40 + bytes([n]))
    return buffer.getvalue()


class Server:
    """Serves /name.zip with Range support; `faults` maps a name to 'truncate', 'drop_once' or 'corrupt'."""

    def __init__(self):
        self.files = {f"{folder}.zip": stand_in_zip(folder) for folder in FOLDERS}
        self.faults: dict[str, str] = {}
        self.requests: list[tuple[str, str | None]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                outer.requests.append((name, self.headers.get("Range")))
                body = outer.files.get(name)
                if body is None:
                    self.send_error(404)
                    return
                fault = outer.faults.get(name)
                if fault == "corrupt":
                    body = body[:-10] + b"x" * 10
                start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                payload = body[start:]
                if fault == "truncate" or fault == "drop_once":
                    self.wfile.write(payload[: len(payload) // 2])
                    self.wfile.flush()
                    if fault == "drop_once":
                        outer.faults.pop(name)
                    self.close_connection = True
                    return
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def archives(self, record_checksums=True):
        return tuple(
            Archive(
                self.url + f"{folder}.zip",
                folder,
                count,
                size=len(self.files[f"{folder}.zip"]) if record_checksums else None,
                sha256=hashlib.sha256(self.files[f"{folder}.zip"]).hexdigest() if record_checksums else None,
            )
            for folder, (_, count) in FOLDERS.items()
        )


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()


def test_download_verifies_extracts_and_counts(server, tmp_path):
    dest = run_download("isic2016", tmp_path / "isic", progress=False, archives=server.archives())
    assert len(find_pairs(dest, "train")[0]) == 3 and len(find_pairs(dest, "test")[0]) == 2
    requests = len(server.requests)
    run_download("isic2016", dest, progress=False, archives=server.archives())  # all there: nothing fetched
    assert len(server.requests) == requests


def test_dropped_connection_resumes_where_it_stopped(server, tmp_path):
    name = "ISBI2016_ISIC_Part1_Training_Data.zip"
    server.faults[name] = "drop_once"
    run_download("isic2016", tmp_path / "isic", progress=False, archives=server.archives())
    ranges = [r for n, r in server.requests if n == name]
    assert ranges[0] is None and ranges[1] == f"bytes={len(server.files[name]) // 2}-"


def test_partial_file_from_an_earlier_run_is_resumed(server, tmp_path):
    name = "ISBI2016_ISIC_Part1_Test_Data.zip"
    dest = tmp_path / "isic"
    dest.mkdir()
    (dest / f"{name}.part").write_bytes(server.files[name][:100])
    run_download("isic2016", dest, progress=False, archives=server.archives())
    assert ("ISBI2016_ISIC_Part1_Test_Data.zip", "bytes=100-") in server.requests


def test_a_server_that_always_truncates_is_a_clear_error_and_resumable(server, tmp_path):
    name = "ISBI2016_ISIC_Part1_Test_GroundTruth.zip"
    server.faults[name] = "truncate"
    with pytest.raises(DownloadError, match=f"{name}: download failed after 5 attempts .*run again to resume"):
        run_download("isic2016", tmp_path / "isic", progress=False, archives=server.archives())
    assert (tmp_path / "isic" / f"{name}.part").is_file()


def test_wrong_checksum_is_refused_and_the_bad_file_removed(server, tmp_path):
    name = "ISBI2016_ISIC_Part1_Training_GroundTruth.zip"
    server.faults[name] = "corrupt"
    with pytest.raises(DownloadError, match="SHA-256 .* does not match the recorded"):
        run_download("isic2016", tmp_path / "isic", progress=False, archives=server.archives())
    assert not list((tmp_path / "isic").glob(f"{name}*"))


def test_unrecorded_checksums_are_measured_and_counts_still_checked(server, tmp_path, capsys):
    run_download("isic2016", tmp_path / "ok", progress=False, archives=server.archives(record_checksums=False))
    assert "no checksum recorded; measured size" in capsys.readouterr().out
    wrong_count = tuple(Archive(a.url, a.folder, a.files + 1) for a in server.archives(record_checksums=False))
    with pytest.raises(DownloadError, match="lists 3 image files, expected 4; not extracted"):
        run_download("isic2016", tmp_path / "bad", progress=False, archives=wrong_count)


def test_official_manifest_has_the_four_archives():
    archives = DATASETS["isic2016"]
    assert [a.files for a in archives] == [900, 900, 379, 379]
    assert all(a.url.endswith(f"/{a.folder}.zip") for a in archives)


def deflated_zip(folder: str) -> bytes:
    """A compressed stand-in archive: its members' deflate streams can be damaged without touching its directory."""
    pattern, count = FOLDERS[folder]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for n in range(count):
            zf.writestr(f"{folder}/{pattern.format(n)}", bytes(range(256)) * 40 + bytes([n]))
    return buffer.getvalue()


def test_a_damaged_deflate_stream_names_the_archive_and_leaves_nothing(server, tmp_path):
    name = "ISBI2016_ISIC_Part1_Training_Data.zip"
    body = bytearray(deflated_zip(name.removesuffix(".zip")))
    start = body.index(b"ISIC_0.jpg") + len("ISIC_0.jpg")  # the first member's data follows its local header
    body[start + 5 : start + 40] = b"\xff" * 35
    server.files[name] = bytes(body)
    dest = tmp_path / "isic"
    with pytest.raises(DownloadError, match=f"{name}: not a valid zip"):
        run_download("isic2016", dest, progress=False, archives=server.archives(record_checksums=False))
    assert not [p for p in dest.iterdir() if p.name.endswith(".extracting")]


def test_a_same_named_folder_of_the_users_is_never_replaced(server, tmp_path):
    dest = tmp_path / "isic"
    mine = dest / "ISBI2016_ISIC_Part1_Training_Data"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("my notes")
    with pytest.raises(DownloadError, match="exists and does not hold the 3 images"):
        run_download("isic2016", dest, progress=False, archives=server.archives())
    assert (mine / "notes.txt").read_text() == "my notes"
