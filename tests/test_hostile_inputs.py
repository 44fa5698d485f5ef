"""Files an attacker or a careless colleague could hand over: checkpoints that run code, image bombs,
images and masks in odd or broken formats. Each is refused with one line naming the file; the rest goes on."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import local_client, write_dataset
from lesionseg.cli import main
from lesionseg.errors import LesionsegError
from lesionseg.images import MAX_PIXELS
from lesionseg.segment.serve import create_app
from lesionseg.train.checkpoint import load_checkpoint
from lesionseg.train.data import find_pairs, load_split
from lesionseg.train.predictor import TorchPredictor


class RunsCode:
    """Unpickling this creates `marker` (a harmless stand-in for any shell command)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def evil_checkpoint(tmp_path, tiny_checkpoint) -> tuple[Path, Path]:
    """A run folder whose best.pt and last.pt look like lesionseg checkpoints but run code when unpickled."""
    marker = tmp_path / "pwned"
    run = tmp_path / "evil-run"
    run.mkdir()
    shutil.copy(tiny_checkpoint.parent / "config.yaml", run / "config.yaml")
    for name in ("best.pt", "last.pt"):
        torch.save({"model": RunsCode(marker), "config": {}, "epoch": 1}, run / name)
    return run, marker


@pytest.mark.parametrize("command", ["predict", "evaluate", "export", "serve", "resume"])
def test_a_checkpoint_that_would_run_code_is_refused_and_never_runs(evil_checkpoint, tmp_path, photos, capsys, command):
    run, marker = evil_checkpoint
    checkpoint = str(run / "best.pt")
    argv = {
        "predict": [
            "predict",
            "--checkpoint",
            checkpoint,
            str(photos),
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ],
        "evaluate": ["evaluate", checkpoint, "--no-progress"],
        "export": ["export", "--checkpoint", checkpoint, "--onnx", str(tmp_path / "m.onnx")],
        "serve": ["serve", "--checkpoint", checkpoint, "--port", "1"],
        "resume": ["train", "--resume", str(run), "--no-progress"],
    }[command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refused" in err and ".pt" in err
    assert str(run) in err
    assert not marker.exists()


def test_checkpoints_from_before_weights_only_still_load(tiny_checkpoint, tmp_path):
    """lesionseg 0.1 stored numpy's RNG state as an ndarray: that one plain type is allowed."""
    state = load_checkpoint(tiny_checkpoint)
    state["rng"]["numpy"] = np.random.get_state()
    torch.save(state, tmp_path / "old.pt")
    assert isinstance(load_checkpoint(tmp_path / "old.pt")["rng"]["numpy"][1], np.ndarray)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height 8-bit grayscale pixels (its data is a few rows)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * (width + 1) * 4, 9)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", rows) + png_chunk(b"IEND", b"")


def noise_png(size: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


HOSTILE = {  # name -> (bytes, what the one-line message says)
    "bomb.png": (bomb_png(30_000, 30_000), "900,000,000 pixels claimed"),
    "wide.png": (bomb_png(10_000, 7_000), "10000x7000 = 70,000,000 pixels claimed"),
    "text.jpg": (b"hello, not an image", "not an image"),
    "cut.png": (noise_png()[:3000], "cannot read image"),
    "empty.jpg": (b"", "not an image"),
}


def test_bomb_helper_is_small_and_over_the_limit():
    assert len(HOSTILE["bomb.png"][0]) < 100_000 and 30_000**2 > MAX_PIXELS


def test_predict_skips_each_hostile_image_with_one_line_and_segments_the_rest(
    tiny_checkpoint, photos, tmp_path, capsys
):
    for name, (content, _) in HOSTILE.items():
        (photos / name).write_bytes(content)
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(tiny_checkpoint), str(photos), "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == len(HOSTILE)
    for name, (_, message) in HOSTILE.items():
        assert any(name in line and message in line for line in err), name
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["a.png", "b.png", "c.png"]


@pytest.mark.parametrize("kind", ["image", "mask"])
def test_the_data_check_lists_a_bomb_and_keeps_the_other_pairs(tmp_path, kind):
    """One policy for train, evaluate and the data check: they all read pairs through load_split."""
    data = write_dataset(tmp_path / "data", {"train": 4, "test": 3})
    pairs, _ = find_pairs(data, "test")
    bomb = pairs[0].image.with_suffix(".png") if kind == "image" else pairs[0].mask
    if kind == "image":
        pairs[0].image.unlink()
    bomb.write_bytes(bomb_png(30_000, 30_000))
    split = load_split(data, "test", size=32, quiet=True)
    assert len(split) == 2
    assert len(split.skipped) == 1 and str(bomb) in split.skipped[0] and "900,000,000 pixels" in split.skipped[0]


def test_evaluate_scores_the_readable_test_images_and_names_the_bomb(tiny_checkpoint, tmp_path, capsys):
    data = write_dataset(tmp_path / "data", {"train": 2, "test": 3})
    pairs, _ = find_pairs(data, "test")
    pairs[1].image.write_bytes(bomb_png(20_000, 20_000))
    assert (
        main(["evaluate", str(tiny_checkpoint), "--data", str(data), "--out", str(tmp_path / "eval"), "--no-progress"])
        == 0
    )
    assert f"{pairs[1].image}: 400,000,000 pixels claimed" in capsys.readouterr().err
    assert len((tmp_path / "eval" / "per_image.csv").read_text().splitlines()) == 1 + 2


def test_training_skips_a_bomb_in_the_training_folder(tmp_path):
    data = write_dataset(tmp_path / "data", {"train": 6, "test": 2})
    pairs, _ = find_pairs(data, "train")
    pairs[2].image.write_bytes(bomb_png(30_000, 30_000))
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                str(data),
                "--out",
                str(run),
                "--no-pretrained",
                "--epochs",
                "1",
                "--image-size",
                "32",
                "--batch-size",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    skipped = yaml.safe_load((run / "run.json").read_text())["data_skipped"]
    assert any(str(pairs[2].image) in line and "pixels claimed" in line for line in skipped)


def test_serve_answers_413_for_a_bomb_and_keeps_serving(tiny_checkpoint):
    client = local_client(create_app(TorchPredictor(tiny_checkpoint)))
    response = client.post("/predict", files={"file": ("bomb.png", HOSTILE["bomb.png"][0], "image/png")})
    assert response.status_code == 413 and "bomb.png: 900,000,000 pixels claimed" in response.json()["detail"]
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 150, 120)).save(buffer, "PNG")
    assert client.post("/predict", files={"file": ("ok.png", buffer.getvalue(), "image/png")}).status_code == 200


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda state: state["config"].update(arch="unet"), "its weights do not fit its config"),
        (lambda state: state["config"].update(image_size="big"), "its stored config is not valid"),
        (lambda state: state.update(model={}), "its weights do not fit its config"),
    ],
)
def test_a_checkpoint_whose_contents_do_not_fit_is_one_line_naming_it(
    tiny_checkpoint, tmp_path, photos, capsys, change, message
):
    state = load_checkpoint(tiny_checkpoint)
    change(state)
    broken = tmp_path / "broken.pt"
    torch.save(state, broken)
    for argv in (
        ["evaluate", str(broken)],
        ["export", "--checkpoint", str(broken), "--onnx", str(tmp_path / "m.onnx")],
        ["predict", str(photos), "--checkpoint", str(broken), "--out", str(tmp_path / "o")],
    ):
        assert main([*argv, "--no-progress"] if argv[0] != "export" else argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and str(broken) in err and message in err and "Traceback" not in err
    assert not (tmp_path / "m.onnx").exists()


def test_an_empty_model_path_is_refused_not_read_as_the_released_model():
    import lesionseg
    from lesionseg.errors import LesionsegError

    with pytest.raises(LesionsegError, match="empty model path"):
        lesionseg.load("")


# --- Never lose what is there ------------------------------------------------------------------------------------


def predict(checkpoint: Path, *inputs: Path, out: Path, extra: tuple[str, ...] = ()) -> int:
    return main(
        ["predict", "--checkpoint", str(checkpoint), *map(str, inputs), "--out", str(out), "--no-progress", *extra]
    )


def test_predict_never_replaces_a_file_it_did_not_write(tiny_checkpoint, photos, tmp_path, capsys):
    """An --out folder holding the user's own masks/a.png: refused, nothing written; the same when --out is the
    input folder itself and the user's mask lies there (it would also be an input with the id a)."""
    theirs = tmp_path / "theirs"
    (theirs / "masks").mkdir(parents=True)
    for out in (theirs, photos):
        (out / "masks").mkdir(exist_ok=True)
        (out / "masks" / "a.png").write_bytes(b"the user's own mask")
        before = sorted(out.rglob("*"))
        assert predict(tiny_checkpoint, photos, out=out) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "masks/a.png" in err and "nothing was written" in err
        assert (out / "masks" / "a.png").read_bytes() == b"the user's own mask" and sorted(out.rglob("*")) == before


def test_predict_into_a_folder_inside_its_input_never_segments_its_own_outputs(tiny_checkpoint, photos, capsys):
    out = photos / "segmented"
    for _ in range(2):  # the second run redoes its own files, which its record names
        assert predict(tiny_checkpoint, photos, out=out, extra=("--overlays",)) == 0
    rows = json.loads((out / "predictions.json").read_text())
    assert sorted(row["mask"] for row in rows) == ["masks/a.png", "masks/b.png", "masks/c.png"]
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["a.png", "b.png", "c.png"]
    assert "segmented" not in capsys.readouterr().err


def test_predict_refuses_a_foreign_record_and_unusable_output_folders(tiny_checkpoint, photos, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "predictions.csv").write_text("someone,else's\n")
    (tmp_path / "a-file").write_text("x")
    for out, message in (
        (foreign, "exists without predictions.json: not written by lesionseg predict"),
        (tmp_path / "a-file", "output folder is an existing file"),
        (tmp_path / "a-file" / "below", "cannot create the output folder"),
    ):
        assert predict(tiny_checkpoint, photos, out=out) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, err
    assert (foreign / "predictions.csv").read_text() == "someone,else's\n"


def tiny_train(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--no-pretrained", "--epochs", "1", "--image-size", "32",
            "--batch-size", "4", "--no-progress", *extra]  # fmt: skip


def run_files(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.is_file()}


def test_training_into_an_existing_run_is_refused_unless_resumed_or_overwritten(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(tiny_train(tiny_data, run)) == 0
    before = run_files(run)
    assert main([*tiny_train(tiny_data, run), "--preset", "model1-frozen"]) == 2
    assert "holds a training run already" in capsys.readouterr().err
    assert main([*tiny_train(tmp_path / "no-such-data", run), "--overwrite"]) == 2  # validated before written
    assert "no-such-data" in capsys.readouterr().err
    assert run_files(run) == before  # config.yaml included: the run can still be resumed
    assert main([*tiny_train(tiny_data, run, "--lr", "0.01"), "--overwrite"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["lr"] == 0.01


def test_a_killed_checkpoint_write_leaves_no_temp_file_behind_on_resume(tiny_data, tmp_path):
    run = tmp_path / "run"
    assert main(tiny_train(tiny_data, run)) == 0
    stale = run / ".last.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert not stale.exists()


def test_a_diverging_run_stops_with_one_line_and_saves_no_nan_model(tiny_data, tmp_path, capsys, monkeypatch):
    import lesionseg.train.training as training

    run = tmp_path / "run"
    real = training.train_one_epoch
    monkeypatch.setattr(training, "train_one_epoch", lambda *a: (float("nan"), real(*a)[1]))
    assert main(tiny_train(tiny_data, run)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "training diverged in epoch 1" in err and "no model was saved" in err and "--lr" in err
    assert not (run / "best.pt").exists() and not (run / "last.pt").exists()


def test_export_never_replaces_the_checkpoint_or_a_foreign_file(tiny_checkpoint, tmp_path, capsys):
    before = tiny_checkpoint.read_bytes()
    foreign = tmp_path / "notes.onnx"
    foreign.write_text("my notes")
    for target, message in (
        (tiny_checkpoint, "must end in .onnx"),
        (foreign, "exists and is not a model lesionseg exported"),
    ):
        assert main(["export", "--checkpoint", str(tiny_checkpoint), "--onnx", str(target)]) == 2
        assert message in capsys.readouterr().err
    assert tiny_checkpoint.read_bytes() == before and foreign.read_text() == "my notes"


# --- Bounded memory ----------------------------------------------------------------------------------------------


def onnx_file(path: Path, metadata: dict[str, str], input_shape=("batch", 3, 32, 32), output_shape=None, bomb=False):
    """A small hand-built ONNX graph (mean over channels, an optional 60000x60000 ConstantOfShape)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, initializers, source = [], [], "image"
    if bomb:
        initializers.append(numpy_helper.from_array(np.array([60000, 60000], np.int64), "shape"))
        value = helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])
        nodes += [
            helper.make_node("ConstantOfShape", ["shape"], ["big"], value=value),
            helper.make_node("ReduceMax", ["big"], ["top"], keepdims=0),
            helper.make_node("Mul", ["image", "top"], ["scaled"]),
        ]
        source = "scaled"
    nodes.append(helper.make_node("ReduceMean", [source], ["probability"], axes=[1], keepdims=output_shape is None))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, output_shape or ["batch", 1, 32, 32])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, metadata)
    onnx.save(model, path)
    return path


GOOD_METADATA = {"image_size": "32", "threshold": "0.5"}


@pytest.mark.parametrize(
    "metadata, kwargs, message",
    [
        ({**GOOD_METADATA}, {"bomb": True}, "needs more than 1.5 GiB of memory"),
        ({"image_size": "100000", "threshold": "0.5"}, {}, "image_size 100000 is not a multiple of 32"),
        ({"image_size": "big", "threshold": "0.5"}, {}, "is not a number"),
        ({"image_size": "32"}, {}, "threshold missing"),
        ({**GOOD_METADATA, "version": "v" * 1_000_000}, {}, "version is 1,000,000 characters"),
        ({**GOOD_METADATA}, {"input_shape": (1, 3, 32, 32)}, "with a dynamic batch"),
        ({**GOOD_METADATA}, {"input_shape": ("batch", 1, 32, 32)}, "expected (batch, 3, 32, 32)"),
        ({**GOOD_METADATA}, {"output_shape": ["batch", 32, 32]}, "answers shape (2, 32, 32)"),
        ({}, {}, "no image_size in its metadata"),
    ],
)
def test_an_onnx_model_that_does_not_fit_is_refused_at_load_in_one_line(
    tmp_path, photos, capsys, metadata, kwargs, message
):
    import resource

    from lesionseg.segment.predictors import OnnxPredictor

    model = onnx_file(tmp_path / "model.onnx", metadata, **kwargs)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(LesionsegError, match=re.escape(message)):
        OnnxPredictor(model)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: this process never grew
    for argv in (
        ["predict", "--onnx", str(model), str(photos), "--out", str(tmp_path / "o")],
        ["serve", "--onnx", str(model)],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and str(model) in err and message in err
    assert not (tmp_path / "o").exists()


def test_the_memory_bound_refuses_an_allocation_in_the_child_only():
    from lesionseg.files import bounded

    def allocate() -> None:
        np.ones(3 * 2**30, np.uint8)  # 3 GiB

    assert "needs more than 0.5 GiB" in bounded(allocate, 2**29)
    assert bounded(lambda: None, 2**29) is None and bounded(lambda: "a problem", 2**29) == "a problem"


def test_a_checkpoint_declaring_more_than_a_checkpoint_holds_is_refused_before_it_inflates(
    tiny_checkpoint, monkeypatch, capsys
):
    import lesionseg.train.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "MAX_CHECKPOINT_BYTES", 1000)
    assert main(["evaluate", str(tiny_checkpoint), "--no-progress"]) == 2
    assert "GiB of contents, over the" in capsys.readouterr().err


def test_a_pil_image_or_array_is_held_to_the_file_policy(tiny_checkpoint):
    import lesionseg
    from lesionseg.errors import DataError, ImageTooLargeError

    model = lesionseg.load(tiny_checkpoint)
    with pytest.raises(ImageTooLargeError, match="image 0: 8000x8000 = 64,000,000 pixels"):
        model.segment(Image.new("L", (8000, 8000)))
    with pytest.raises(DataError, match="0x0 pixels has nothing to segment"):
        model.segment(np.zeros((0, 0, 3), np.uint8))
    turned = Image.new("RGB", (40, 20), (200, 150, 120))
    exif = turned.getexif()
    exif[0x0112] = 6  # stored sideways: shown turned a quarter
    turned.info["exif"] = exif.tobytes()
    buffer = io.BytesIO()
    turned.save(buffer, "JPEG", exif=exif.tobytes())
    assert model.segment(Image.open(buffer)).mask.shape == (40, 20)


def post_streaming(app, body):
    """POST a body that arrives as `body` yields it (no Content-Length: chunked), the way a slow client sends."""
    import asyncio

    import httpx

    async def post():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as client:
            headers = {"content-type": "multipart/form-data; boundary=x"}
            return await client.post("/predict", content=body(), headers=headers)

    return asyncio.run(post())


def test_a_chunked_upload_over_the_limit_is_refused_as_it_streams(tiny_checkpoint):
    sent = []

    async def body():
        yield b"--x\r\nContent-Disposition: form-data; name=file; filename=big.png\r\n\r\n"
        for _ in range(100):  # 100 MiB offered, 1 MiB at a time
            sent.append(1)
            yield b"\0" * 2**20

    response = post_streaming(create_app(TorchPredictor(tiny_checkpoint), max_upload_bytes=2 * 2**20), body)
    assert response.status_code == 413 and "2 MiB limit" in response.json()["detail"]
    assert len(sent) < 10


def test_a_slow_upload_is_timed_out(tiny_checkpoint):
    import asyncio

    async def trickle():
        yield b"--x\r\n"
        await asyncio.sleep(2)
        yield b"never"

    response = post_streaming(create_app(TorchPredictor(tiny_checkpoint), upload_timeout_s=0.3), trickle)
    assert response.status_code == 408 and "not complete within 0.3 s" in response.json()["detail"]


def test_a_zip_that_inflates_far_beyond_its_size_is_refused_before_extraction(tmp_path):
    import zipfile

    from lesionseg.train.download import Archive, DownloadError, extract

    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("X/a.png", b"\0" * 20 * 2**20)
    with pytest.raises(DownloadError, match="not images; not extracted"):
        extract(Archive("http://x/X.zip", "X", 1), path, tmp_path)
    with pytest.raises(DownloadError, match="lists 1 image files, expected 900"):
        extract(Archive("http://x/X.zip", "X", 900), path, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.zip"]


def test_a_full_disk_while_extracting_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import errno
    import zipfile

    from lesionseg.train.download import Archive, DownloadError, extract

    path = tmp_path / "X.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("X/a.png", noise_png())

    def full(self, *args, **kwargs):
        Path(args[0], "X").mkdir(parents=True)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(zipfile.ZipFile, "extractall", full)
    with pytest.raises(DownloadError, match="No space left on device"):
        extract(Archive("http://x/X.zip", "X", 1), path, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X.zip"]


# --- Read what we promise ----------------------------------------------------------------------------------------


def test_masks_of_0_and_1_are_read_as_lesion_and_background(tmp_path):
    from lesionseg.images import inspect_mask

    values = np.zeros((8, 8), np.uint8)
    values[2:5, 2:5] = 1
    Image.fromarray(values).save(tmp_path / "m.png")
    mask, notes = inspect_mask(tmp_path / "m.png")
    assert mask.sum() == 9 and notes == []
    Image.fromarray(values.astype(np.uint16) * 65535).save(tmp_path / "m16.png")
    assert inspect_mask(tmp_path / "m16.png")[0].sum() == 9


def test_float_images_are_scaled_or_refused(tmp_path):
    from lesionseg.errors import DataError
    from lesionseg.images import decode_image

    ramp = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(ramp, mode="F").save(tmp_path / "unit.tif")
    image, notes = decode_image(tmp_path / "unit.tif", "unit.tif")
    assert np.asarray(image)[..., 0].max() == 255 and "float image in [0, 1] scaled" in notes[0]
    Image.fromarray(ramp * 1000 - 500, mode="F").save(tmp_path / "odd.tif")
    with pytest.raises(DataError, match="odd.tif: float image with values from -500 to 500"):
        decode_image(tmp_path / "odd.tif", "odd.tif")


# --- One line, never a traceback ---------------------------------------------------------------------------------


def test_folder_inputs_name_every_file_they_do_not_segment(tiny_checkpoint, photos, tmp_path, capsys):
    os.mkfifo(photos / "pipe.png")
    (photos / "dangling.jpg").symlink_to(tmp_path / "nothing")
    (photos / "loop.jpg").symlink_to(photos / "loop.jpg")
    (photos / "notes.txt").write_text("x")
    (photos / "anim.gif").write_bytes(b"GIF89a")
    Image.new("RGB", (30, 30), (200, 150, 120)).save(photos / "d.webp")
    shutil.copy(photos / "a.jpg", photos / os.fsdecode(b"caf\xe9.jpg"))  # a Latin-1 name: not UTF-8
    (tmp_path / "empty.png").mkdir()  # a folder whose name looks like an image
    assert predict(tiny_checkpoint, photos, tmp_path / "empty.png", out=tmp_path / "out") == 1
    err = capsys.readouterr().err
    for expected in (
        "pipe.png: not a regular file",
        "dangling.jpg: a broken symbolic link",
        "loop.jpg: a symbolic link that loops",
        "2 file(s) in no supported format: anim.gif, notes.txt",
        "empty.png: no image",
    ):
        assert expected in err, expected
    rows = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    assert sorted(Path(row["mask"]).name for row in rows) == ["a.png", "b.png", "c.png", "caf\ufffd.png", "d.png"]


def test_two_images_with_one_id_are_refused_with_both_names(tiny_checkpoint, photos, tmp_path, capsys):
    shutil.copy(photos / "b.png", photos / "a.png")
    assert predict(tiny_checkpoint, photos, out=tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "a.jpg and" in err and "a.png would both be written as masks/a.png" in err
    data = write_dataset(tmp_path / "data", {"train": 3})
    image = find_pairs(data, "train")[0][0].image
    shutil.copy(image, image.with_suffix(".png"))
    with pytest.raises(LesionsegError, match="two images with the id"):
        find_pairs(data, "train")


def test_a_damaged_cache_is_rebuilt_with_a_note(tiny_data, tmp_path, capsys):
    cache = tmp_path / "cache"
    load_split(tiny_data, "train", size=32, cache_dir=cache, quiet=True)
    for path in cache.glob("*.pt"):
        path.write_bytes(b"garbage")
    assert len(load_split(tiny_data, "train", size=32, cache_dir=cache, quiet=True)) == 10
    assert "damaged cache" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr", "nan"], "lr must be a finite number"),
        (["--weight-decay", "-1"], "weight_decay >= 0"),
        (["--dropout", "2"], "dropout must be in [0, 1)"),
        (["--patience", "-1"], "patience and warmup_epochs >= 0"),
        (["--device", "banana"], "unknown device 'banana'"),
        (["--device", "cuda:7"], "--device cuda:7: PyTorch sees"),
        (["--image-size", "16000"], "multiple of 32 from 32 to 1024"),
        (["--name", "n" * 300], "name is 300 characters"),
        (["--scale", "1.5"], "scale must be in [0, 1) and colour in [0, 1]"),
        (["--colour", "-0.1"], "scale must be in [0, 1) and colour in [0, 1]"),
    ],
)
def test_option_values_pytorch_would_reject_are_one_line(tiny_data, tmp_path, capsys, argv, message):
    assert main([*tiny_train(tiny_data, tmp_path / "run"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "".join(err)
    assert not (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["predict", "x.jpg", "--out", "o", "--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
        (["serve", "--port", "80000"], "a TCP port is 1 to 65535, got 80000"),
        (["serve", "--port", "-1"], "a TCP port is 1 to 65535, got -1"),
        (["predict", "x.jpg", "--out", "o", "--precision", "int4"], "--precision: invalid choice: 'int4'"),
    ],
)
def test_bad_flags_are_one_line_not_the_usage_block(capsys, argv, message):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit.value.code == 2 and err.count("\n") == 0 and message in err and "--help" in err


def test_compare_the_same_run_twice_and_resume_of_a_broken_run_are_one_line(tiny_checkpoint, tmp_path, capsys):
    run = tiny_checkpoint.parent
    assert main(["compare", str(run), str(run), "--out", str(tmp_path / "c"), "--no-progress"]) == 2
    assert "named twice" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    state = load_checkpoint(broken / "last.pt")
    del state["epoch"]
    torch.save(state, broken / "last.pt")
    assert main(["train", "--resume", str(broken), "--no-progress"]) == 2
    assert "last.pt: cannot be resumed (KeyError" in capsys.readouterr().err
    (broken / "config.yaml").write_text("lr: [1\n")
    assert main(["train", "--resume", str(broken), "--no-progress"]) == 2
    assert "config.yaml: not a readable config" in capsys.readouterr().err


def test_serving_beyond_this_machine_warns_that_there_is_no_authentication(tiny_checkpoint, capsys, monkeypatch):
    import lesionseg.segment.serve

    monkeypatch.setattr(lesionseg.segment.serve, "run_serve", lambda *args: None)
    assert main(["serve", "--checkpoint", str(tiny_checkpoint), "--backend", "torch", "--host", "0.0.0.0"]) == 0
    assert "no authentication" in capsys.readouterr().err


def test_an_error_is_reported_without_importing_pytorch(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys; from lesionseg.cli import main; "
        f"status = main(['evaluate', {str(tmp_path / 'missing.pt')!r}]); "
        "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(status)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0 and "missing.pt: checkpoint not found" in done.stderr


def test_evaluate_and_compare_never_replace_files_they_did_not_write(tiny_checkpoint, tmp_path, capsys):
    run = tiny_checkpoint.parent
    for command, name in (
        (["evaluate", str(tiny_checkpoint)], "metrics.json"),
        (["evaluate", str(tiny_checkpoint)], "per_image.csv"),
        (["compare", str(run)], "results.md"),
    ):
        out = tmp_path / f"out-{len(command)}-{name}"
        out.mkdir()
        (out / name).write_text("the user's own")
        assert main([*command, "--out", str(out), "--no-progress"]) == 2
        assert f"{name}: exists and was not written by lesionseg" in capsys.readouterr().err
        assert [p.name for p in out.iterdir()] == [name] and (out / name).read_text() == "the user's own"
    out = tmp_path / "ours"
    for _ in range(2):  # its own files are rewritten
        assert main(["evaluate", str(tiny_checkpoint), "--out", str(out), "--no-progress"]) == 0
