"""Predictors: uint8 images (B,3,S,S) at the model's size -> lesion probabilities (B,1,S,S), NumPy in and out.

An exported model runs in onnxruntime (the released one included: no PyTorch needed); a checkpoint runs in
PyTorch, imported only when one is loaded, or is exported to onnxruntime first.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
from importlib import resources
from importlib.util import find_spec
from pathlib import Path

import numpy as np

from lesionseg.errors import LesionsegError
from lesionseg.pipeline import Predictor

RELEASED_MODEL = "release/lesionseg-unet.onnx"  # inside the package; see MODEL_CARD.md
TRAIN_EXTRA = "pip install 'lesionseg[train]'"


def require_torch(what: str) -> None:
    """A one-line error, not an ImportError, where a light install lacks PyTorch."""
    if find_spec("torch") is None:
        raise LesionsegError(f"{what} needs PyTorch, which this installation lacks: {TRAIN_EXTRA}")


class TorchPredictor:
    """A trained checkpoint, rebuilt from its stored config (PyTorch is imported only here)."""

    def __init__(self, checkpoint: str | os.PathLike, channels_last: bool = False, state: dict | None = None) -> None:
        """`state`: the checkpoint already read from `checkpoint`, so it is not read twice."""
        require_torch(f"{checkpoint}: running a checkpoint")
        import torch

        from lesionseg.checkpoint import load_checkpoint, model_from_checkpoint

        state = state if state is not None else load_checkpoint(checkpoint)
        self.model, config = model_from_checkpoint(state, checkpoint)
        self.image_size, self.threshold = config.image_size, config.threshold
        self.name = config.model_name
        self.version = f"{Path(checkpoint).name}, epoch {state.get('epoch', '?')}, lesionseg {state.get('info', {}).get('lesionseg', '?')}"
        self.channels_last = channels_last
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        import torch

        from lesionseg.augmentation import normalize

        with torch.inference_mode():
            x = normalize(torch.from_numpy(np.array(images)))  # a copy: arrays from Pillow are read-only
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return torch.sigmoid(self.model(x)).numpy()


class OnnxPredictor:
    """An exported model run by onnxruntime; size, threshold, name and version come from the file's metadata."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise LesionsegError(f"{path}: ONNX model not found")
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own types for a foreign or damaged file
            raise LesionsegError(f"{path}: not a readable ONNX model ({exc.__class__.__name__})") from None
        self.metadata = self.session.get_modelmeta().custom_metadata_map
        if "image_size" not in self.metadata:
            raise LesionsegError(f"{path}: not exported by lesionseg (no image_size in its metadata)")
        self.image_size, self.threshold = int(self.metadata["image_size"]), float(self.metadata["threshold"])
        self.name = self.metadata.get("name", f"{self.metadata.get('arch', 'model')} ({self.image_size} px)")
        self.version = self.metadata.get("version", path.name)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = np.asarray(images, dtype=np.float32) / 255
        return self.session.run(None, {"image": x})[0]


def released_model() -> Path:
    """The model that ships inside the package (ONNX, metadata inside)."""
    path = Path(str(resources.files("lesionseg").joinpath(RELEASED_MODEL)))
    if not path.is_file():
        raise LesionsegError(
            f"{path}: the released model is missing from this installation; "
            "pass --checkpoint or --onnx, or reinstall lesionseg"
        )
    return path


def load_predictor(
    checkpoint: str | os.PathLike | None = None, onnx: str | os.PathLike | None = None, backend: str = "torch"
) -> Predictor:
    """A checkpoint, an ONNX file (onnxruntime), or with neither the released model. A checkpoint runs in
    PyTorch, or with backend "onnxruntime" exported and run there ("auto": onnxruntime if installed)."""
    if checkpoint and onnx:
        raise LesionsegError("give either --checkpoint CKPT or --onnx MODEL, not both")
    if not checkpoint:
        return OnnxPredictor(onnx or released_model())
    if backend == "onnxruntime" or (backend == "auto" and find_spec("onnxruntime") is not None):
        return exported_predictor(checkpoint)
    return TorchPredictor(checkpoint)


def load_any(model: str | os.PathLike | None) -> Predictor:
    """The released model (None), an `.onnx` file, or a checkpoint / run folder (in PyTorch)."""
    if model is not None and not str(model).strip():
        raise LesionsegError("empty model path: pass nothing for the released model, or a file or run folder")
    if model is not None and Path(model).suffix.lower() == ".onnx":
        return OnnxPredictor(model)
    return load_predictor(checkpoint=model)


def _export_in_child(checkpoint: str, path: str, errors) -> None:
    try:
        from lesionseg.export import export_onnx

        export_onnx(checkpoint, path)
    except LesionsegError as exc:
        errors.put(str(exc))
    except Exception as exc:  # reported to the parent as one line; the child's traceback helps no user
        errors.put(f"{checkpoint}: export failed ({exc.__class__.__name__}: {exc})")


def exported_predictor(checkpoint: str | os.PathLike) -> OnnxPredictor:
    """The checkpoint exported to a temporary ONNX file and loaded by onnxruntime (the file is not kept).
    The export runs in a spawned child calling `export_onnx`, so PyTorch never enters this process: a server
    holds ~0.3 GB, not ~1.3."""
    require_torch(f"{checkpoint}: exporting a checkpoint")
    context = multiprocessing.get_context("spawn")
    errors = context.Queue()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        child = context.Process(target=_export_in_child, args=(str(checkpoint), str(path), errors))
        child.start()
        child.join()
        if child.exitcode != 0 or not errors.empty() or not path.is_file():
            message = errors.get() if not errors.empty() else f"{checkpoint}: export failed (status {child.exitcode})"
            raise LesionsegError(message)
        return OnnxPredictor(path)
