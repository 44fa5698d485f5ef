"""Tiny synthetic datasets: bright discs (lesions) on noisy skin, in the official ISIC layout."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lesionseg.train.data import OFFICIAL_DIRS

ROOT = Path(__file__).resolve().parents[1]


def load_script(folder: str, name: str):
    """A script of tools/ or benchmarks/ as a module; its folder goes on sys.path, as when it runs, so it can
    import its siblings (common.py, external_split.py)."""
    where = ROOT / folder
    if str(where) not in sys.path:
        sys.path.insert(0, str(where))
    spec = importlib.util.spec_from_file_location(name, where / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path_factory, monkeypatch):
    """No test reads or writes the user's caches, and none can fetch weights."""
    monkeypatch.setenv("LESIONSEG_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
    monkeypatch.delenv("LESIONSEG_WEIGHTS", raising=False)


def disc_pair(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(0.3, 0.7, 2) * size
    radius = rng.uniform(0.15, 0.3) * size
    mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    image = rng.normal(200, 10, (size, size, 3))
    image[mask] = rng.normal(90, 10, (int(mask.sum()), 3))
    return image.clip(0, 255).astype(np.uint8), mask


def write_dataset(root: Path, counts: dict[str, int], size: int = 48, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, count in counts.items():
        image_dir, mask_dir = (root / d for d in OFFICIAL_DIRS[split])
        image_dir.mkdir(parents=True)
        mask_dir.mkdir(parents=True)
        for n in range(count):
            image, mask = disc_pair(rng, size)
            stem = f"ISIC_{split}{n:04d}"
            Image.fromarray(image).save(image_dir / f"{stem}.jpg", quality=95)
            Image.fromarray(mask.astype(np.uint8) * 255).save(mask_dir / f"{stem}_Segmentation.png")
    return root


def write_plain_pairs(root: Path, count: int, size: int = 48, seed: int = 7, prefix: str = "ISIC_extra") -> Path:
    """`count` pairs in the plain layout (root/images/*.jpg, root/masks/*.png), like isic2018-extra-256."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for n in range(count):
        image, mask = disc_pair(rng, size)
        Image.fromarray(image).save(root / "images" / f"{prefix}{n:04d}.jpg", quality=95)
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"{prefix}{n:04d}.png")
    return root


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    """10 training and 4 test pairs, 48x48."""
    return write_dataset(tmp_path / "data", {"train": 10, "test": 4})


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A seed-arch model trained one epoch at 32 px on synthetic discs (enough to exercise inference)."""
    from lesionseg.train.config import build_config
    from lesionseg.train.training import fit

    root = tmp_path_factory.mktemp("trained")
    data = write_dataset(root / "data", {"train": 8, "test": 4}, seed=1)
    config = build_config(
        "model2-finetune",
        data=str(data),
        out=str(root / "run"),
        weights="none",
        image_size=32,
        epochs=1,
        batch_size=4,
        cache_dir=str(root / "cache"),
    )
    return fit(config, progress=False) / "best.pt"


@pytest.fixture
def photos(tmp_path) -> Path:
    """Three 'user photos' of different sizes and formats in a folder."""
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(5)
    for name, size in (("a.jpg", 70), ("b.png", 40), ("c.jpeg", 96)):
        Image.fromarray(disc_pair(rng, size)[0]).save(folder / name)
    return folder


def local_client(app, **headers):
    """A test client that calls the app by a loopback name, as the browser on the user's machine does (the app
    refuses any other Host: DNS rebinding), and posts PNG masks declared as image/png."""
    from fastapi.testclient import TestClient

    return TestClient(app, base_url="http://127.0.0.1:8001", headers=headers)


def fake_click_model(path: Path, size: int = 64) -> Path:
    """A click model in the shipped file's format that does the obvious thing: the previous mask, plus a disk at
    each positive click, less one at each negative click. The plumbing is tested with it; the trained model's
    quality is a benchmark's (benchmarks/clicks.py)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.array([1.0, -1.0, 1.0], np.float32).reshape(1, 3, 1, 1), "weight")
    low, high = (
        numpy_helper.from_array(np.array(0.0, np.float32), "low"),
        numpy_helper.from_array(np.array(1.0, np.float32), "high"),
    )
    graph = helper.make_graph(
        [helper.make_node("Conv", ["guide", "weight"], ["sum"]), helper.make_node("Clip", ["sum", "low", "high"], ["probability"])],
        "fake-clicks",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, size, size]),
         helper.make_tensor_value_info("guide", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["N", 1, size, size])],
        [weight, low, high],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(
        model, {"kind": "clicks", "image_size": str(size), "threshold": "0.5", "name": "fake clicks"}
    )
    onnx.save(model, str(path))
    return path


@contextlib.contextmanager
def served(app):
    """`app` on a free port of 127.0.0.1 in a thread, for a real browser: yields its URL."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(5)
