"""Files an attacker or a careless colleague could hand over: checkpoints that run code, image bombs,
images and masks in odd or broken formats. Each is refused with one line naming the file; the rest goes on."""

from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from PIL import Image

from conftest import write_dataset
from lesionseg.checkpoint import load_checkpoint
from lesionseg.cli import main
from lesionseg.data import find_pairs, load_split
from lesionseg.images import MAX_PIXELS
from lesionseg.predictors import TorchPredictor
from lesionseg.serve import create_app


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
    assert sorted(p.name for p in out.glob("*_mask.png")) == ["a_mask.png", "b_mask.png", "c_mask.png"]


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
    client = TestClient(create_app(TorchPredictor(tiny_checkpoint)))
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
