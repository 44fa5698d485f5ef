"""predict's output folder as a small database: one writer per shard, rows that name their model and input,
reruns and merges that lose nothing, files others can read (lesionseg.segment.outputs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import disc_pair
from lesionseg.cli import main
from lesionseg.errors import LesionsegError
from lesionseg.files import locked
from lesionseg.segment.outputs import Shard, merge


def write_photos(folder: Path, count: int, seed: int = 0, size: int = 40) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for n in range(count):
        Image.fromarray(disc_pair(rng, size)[0]).save(folder / f"IMG_{n:04d}.jpg")
    return folder


def predict(*args: str | Path) -> int:
    return main(["predict", *map(str, args), "--no-progress"])


def rows_of(out: Path) -> list[dict]:
    return json.loads((out / "predictions.json").read_text())


@pytest.fixture
def onnx_model(tiny_checkpoint, tmp_path_factory) -> Path:
    from lesionseg.train.export import export_onnx

    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("onnx") / "tiny.onnx")


def test_rows_name_their_model_and_input_and_files_are_readable_by_others(onnx_model, tmp_path):
    photos, out = write_photos(tmp_path / "a", 3), tmp_path / "out"
    old = os.umask(0o022)
    try:
        assert predict(photos, "--out", out, "--onnx", onnx_model) == 0
    finally:
        os.umask(old)
    row = rows_of(out)[0]
    assert row["model_sha256"] and row["model"] and row["model_version"]
    assert row["file_bytes"] == (photos / "IMG_0000.jpg").stat().st_size and row["file_mtime_ns"] > 0
    for path in [out / "predictions.json", out / "predictions.csv", *(out / "masks").iterdir()]:
        assert path.stat().st_mode & 0o777 == 0o644, path  # the user's umask, not 0600


def test_a_second_writer_of_the_same_shard_is_refused_naming_the_first(onnx_model, tmp_path, capsys):
    photos, out = write_photos(tmp_path / "a", 2), tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from lesionseg.files import locked\n"
         f"with locked(Path({str(out)!r}) / {Shard().lock!r}, 'x'):\n print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        assert predict(photos, "--out", out, "--onnx", onnx_model) == 2
        said = capsys.readouterr().err
        assert "in use by lesionseg (pid" in said and said.count("\n") == 1
        assert not (out / "masks").exists()
    finally:
        holder.kill()
        holder.wait()
    assert predict(photos, "--out", out, "--onnx", onnx_model) == 0  # the lock ends with its process


def test_two_concurrent_runs_into_one_folder_lose_nothing(onnx_model, tmp_path):
    a, b, out = write_photos(tmp_path / "a", 12, 1), write_photos(tmp_path / "b", 12, 2), tmp_path / "out"
    for n, path in enumerate(sorted(b.iterdir())):
        path.rename(b / f"B_{n:04d}.jpg")
    command = [
        sys.executable,
        "-m",
        "lesionseg",
        "predict",
        "--onnx",
        str(onnx_model),
        "--out",
        str(out),
        "--no-progress",
    ]
    runs = [subprocess.Popen([*command, str(folder)], stderr=subprocess.PIPE, text=True) for folder in (a, b)]
    results = [(run.wait(300), run.stderr.read()) for run in runs]
    for code, err in results:
        assert code == 0 or "in use by lesionseg" in err, err
    for folder in (a, b):  # whichever was refused runs now; the folder can always be resumed
        assert predict(folder, "--out", out, "--onnx", onnx_model) == 0
    masks = sorted(p.name for p in (out / "masks").iterdir())
    assert len(masks) == 24 and sorted(Path(r["mask"]).name for r in rows_of(out)) == masks


def test_a_killed_run_leaves_no_debris_and_resumes(onnx_model, tmp_path):
    photos, out = write_photos(tmp_path / "a", 40, size=300), tmp_path / "out"
    command = [sys.executable, "-m", "lesionseg", "predict", str(photos), "--onnx", str(onnx_model), "--out", str(out)]
    run = subprocess.Popen([*command, "--no-progress", "--overlays", "jpg", "--batch-size", "2"])
    journal = out / ".lesionseg-predict.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not journal.exists() or journal.read_text().count('"mask"') < 3):
        time.sleep(0.05)
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    (out / "overlays" / ".IMG_0039.jpg.abcd1234.tmp").write_bytes(b"half")  # as a kill mid-write leaves it
    assert predict(photos, "--out", out, "--onnx", onnx_model, "--overlays", "jpg") == 0
    assert not list(out.rglob("*.tmp"))
    assert len(rows_of(out)) == 40 == len(list((out / "overlays").iterdir()))


def test_a_changed_input_is_redone_and_a_same_named_one_from_elsewhere_refused(onnx_model, tmp_path, capsys):
    a, out = write_photos(tmp_path / "batch1", 2, 1), tmp_path / "out"
    assert predict(a, "--out", out, "--onnx", onnx_model) == 0
    Image.fromarray(np.zeros((50, 60, 3), np.uint8)).save(a / "IMG_0001.jpg")
    capsys.readouterr()
    assert predict(a, "--out", out, "--onnx", onnx_model) == 0
    assert "segmented 1 image(s)" in capsys.readouterr().out
    assert {r["width"] for r in rows_of(out)} == {40, 60}
    b = write_photos(tmp_path / "batch2", 1, 2)  # the camera restarted its numbering: IMG_0000.jpg again
    before = (out / "masks" / "IMG_0000.png").read_bytes()
    assert predict(b, "--out", out, "--onnx", onnx_model) == 2
    said = capsys.readouterr().err
    assert "batch2/IMG_0000.jpg would replace masks/IMG_0000.png" in said and "batch1/IMG_0000.jpg" in said
    assert (out / "masks" / "IMG_0000.png").read_bytes() == before
    assert predict(b, "--out", out, "--onnx", onnx_model, "--overwrite") == 0
    assert [r["file"] for r in rows_of(out) if r["mask"] == "masks/IMG_0000.png"] == [str(b / "IMG_0000.jpg")]


def test_overwrite_with_another_model_leaves_one_models_results(onnx_model, tiny_checkpoint, tmp_path, capsys):
    photos, out = write_photos(tmp_path / "a", 8), tmp_path / "out"
    assert predict(photos, "--out", out, "--onnx", onnx_model, "--shard", "1/2") == 0
    journal = (out / ".lesionseg-predict.1-of-2.jsonl").read_text().splitlines()
    first = {json.loads(line)["mask"] for line in journal if '"mask"' in line}
    assert predict(photos, "--out", out, "--shard", "2/2", "--overwrite") == 0  # the released model
    assert not any((out / mask).exists() for mask in first)  # the other model's masks went with its journal
    assert not (out / ".lesionseg-predict.1-of-2.jsonl").exists() and len(list((out / "masks").iterdir())) == 5
    assert predict(photos, "--out", out, "--shard", "1/2") == 0  # shard 1 can be rerun with the new model
    assert len(rows_of(out)) == 8 == len(list((out / "masks").iterdir()))
    assert len({r["model_sha256"] for r in rows_of(out)}) == 1


def test_merge_refuses_two_models_and_a_folder_predict_never_wrote(onnx_model, tmp_path, capsys):
    photos, out = write_photos(tmp_path / "a", 6), tmp_path / "out"
    assert predict(photos, "--out", out, "--onnx", onnx_model, "--shard", "1/2") == 0
    assert predict(photos, "--out", tmp_path / "other", "--shard", "2/2") == 0
    for journal in (tmp_path / "other").glob(".lesionseg-predict.*.jsonl"):  # as a user copying shards together
        journal.rename(out / journal.name)
    for mask in (tmp_path / "other" / "masks").iterdir():
        mask.rename(out / "masks" / mask.name)
    capsys.readouterr()
    assert main(["merge", str(out)]) == 2
    assert "rows of 2 models" in capsys.readouterr().err
    assert not (out / "predictions.json").exists()  # nothing joined
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["merge", str(empty)]) == 2 and not list(empty.iterdir())
    with pytest.raises(LesionsegError, match="no journal or table"):
        merge(empty)


@pytest.mark.parametrize(
    "env, shard, says",
    [
        ({"RANK": "abc", "WORLD_SIZE": "2"}, None, "RANK='abc'"),
        ({"RANK": "0", "WORLD_SIZE": "0"}, None, "RANK=0 WORLD_SIZE=0"),
        ({"RANK": "5", "WORLD_SIZE": "2"}, None, "RANK=5 WORLD_SIZE=2"),
        ({}, "²/³", "--shard ²/³"),
        ({}, "1/99999999999999999999999", "expected K/N"),
        ({}, "0/2", "expected K/N"),
    ],
)
def test_numbers_from_flags_and_the_environment_are_one_line(
    env, shard, says, onnx_model, tmp_path, monkeypatch, capsys
):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    photos = write_photos(tmp_path / "a", 1)
    extra = ["--shard", shard] if shard else []
    assert predict(photos, "--out", tmp_path / "out", "--onnx", onnx_model, *extra) == 2
    said = capsys.readouterr().err
    assert says in said and said.count("\n") == 1 and "internal error" not in said


@pytest.mark.parametrize(
    "argv, says",
    [
        (["train", "--seed", "-1"], "seed and split_seed must be >= 0"),
        (["summary", "--arch", "bogus"], "invalid choice"),
        (["summary", "--image-size", "33"], "multiple of 32"),
        (["summary", "--image-size", "0"], "multiple of 32"),
        (["summary", "--batch-size", "0"], "at least 1"),
    ],
)
def test_training_numbers_are_checked_in_one_line(argv, says, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own checks exit
        code = exc.code
    assert code == 2
    said = capsys.readouterr().err
    assert says in said and said.count("\n") == 1


def test_segment_refuses_a_batch_size_below_one(onnx_model):
    import lesionseg
    from lesionseg.errors import DataError

    with pytest.raises(DataError, match="batch_size must be a whole number >= 1"):
        lesionseg.load(onnx_model).segment(np.zeros((8, 8, 3), np.uint8), batch_size=0)


def test_an_overlay_jpeg_cannot_hold_is_skipped_by_name_and_the_run_goes_on(onnx_model, tmp_path, monkeypatch, capsys):
    from lesionseg.segment import prediction

    monkeypatch.setattr(prediction, "JPEG_MAX_SIDE", 50)  # as a 70,000-pixel panorama meets libjpeg's limit
    photos = write_photos(tmp_path / "a", 1, size=40)
    Image.fromarray(np.full((30, 60, 3), 128, np.uint8)).save(photos / "wide.png")
    out = tmp_path / "out"
    assert predict(photos, "--out", out, "--onnx", onnx_model, "--overlays", "jpg") == 0
    assert "skipped the overlay of" in capsys.readouterr().err
    rows = {Path(r["mask"]).stem: r for r in rows_of(out)}
    assert rows["wide"]["overlay"] is None and rows["wide"]["overlay_skipped"] and (out / "masks" / "wide.png").exists()
    assert (out / rows["IMG_0000"]["overlay"]).is_file()
    assert predict(photos, "--out", out, "--onnx", onnx_model, "--overlays", "jpg") == 0
    assert "2 already done" in capsys.readouterr().out  # the skipped overlay is not retried forever


def test_the_lock_names_its_holder(tmp_path):
    with locked(tmp_path / "x.lock", "the thing"):
        assert "lesionseg (pid" in (tmp_path / "x.lock").read_text()


def test_overwrite_with_other_options_is_not_refused_by_its_own_lock(tmp_path, capsys):
    photos = write_photos(tmp_path / "in", 2)
    assert predict(photos, "--out", tmp_path / "o") == 0
    assert predict(photos, "--out", tmp_path / "o", "--tta", "--overwrite") == 0
    assert "still writing" not in capsys.readouterr().err
    assert len(rows_of(tmp_path / "o")) == 2


def test_the_pixel_size_is_part_of_a_rows_identity_and_every_csv_image_is_accounted_for(tmp_path, capsys):
    photos = write_photos(tmp_path / "in", 3)
    (photos / "IMG_0002.jpg").rename(photos / "my lesion.jpg")
    out = tmp_path / "o"
    assert predict(photos, "--out", out, "--pixel-size", "0.02") == 0
    first = {row["file"]: row for row in rows_of(out)}
    assert {row["pixel_mm"] for row in first.values()} == {0.02}
    assert predict(photos, "--out", out, "--pixel-size", "0.05") == 0  # another scale: every row redone
    again = rows_of(out)
    assert {row["pixel_mm"] for row in again} == {0.05}
    some = next(iter(first.values()))
    after = next(row for row in again if row["file"] == some["file"])
    assert after["diameter_max_mm"] == pytest.approx(some["diameter_max_mm"] * 2.5, rel=0.01)
    table = tmp_path / "sizes.csv"
    table.write_text(
        "\ufeffimage,pixel_mm\r\nmy lesion.jpg,0.1\r\nIMG_0000.jpg,0.1\r\n", encoding="utf-8"
    )  # Excel's BOM
    capsys.readouterr()
    assert predict(photos, "--out", tmp_path / "o2", "--pixel-size", table) == 0
    sizes = {Path(row["file"]).name: row["pixel_mm"] for row in rows_of(tmp_path / "o2")}
    assert sizes == {"my lesion.jpg": 0.1, "IMG_0000.jpg": 0.1, "IMG_0001.jpg": None}
    assert "1 image(s) not in the pixel-size CSV" in capsys.readouterr().err
