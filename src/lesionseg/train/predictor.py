"""A checkpoint as a predictor: run in PyTorch, or exported to onnxruntime in a child process."""

from __future__ import annotations

import multiprocessing
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from lesionseg.errors import LesionsegError
from lesionseg.files import sha256_of, shown
from lesionseg.segment.predictors import MAX_NAME, OnnxPredictor
from lesionseg.train.augmentation import normalize
from lesionseg.train.checkpoint import load_checkpoint, model_from_checkpoint
from lesionseg.train.rundir import checkpoint_path


def checkpoint_version(path: Path, state: dict) -> str:
    """ "best.pt, epoch 12, lesionseg 0.3.0": what the page and the API say answered, from whatever the file holds."""
    info = state.get("info") if isinstance(state.get("info"), dict) else {}
    text = f"{path.name}, epoch {state.get('epoch', '?')}, lesionseg {info.get('lesionseg', '?')}"
    return shown(text[:MAX_NAME])


class TorchPredictor:
    """A trained checkpoint, rebuilt from its stored config (PyTorch is imported only here)."""

    def __init__(self, checkpoint: str | os.PathLike, channels_last: bool = False, state: dict | None = None) -> None:
        """`state`: the checkpoint already read from `checkpoint`, so it is not read twice."""
        state = state if state is not None else load_checkpoint(checkpoint)
        self.model, config = model_from_checkpoint(state, checkpoint)
        self.image_size, self.threshold = config.image_size, config.threshold
        self.name = config.model_name
        self.version = checkpoint_version(Path(checkpoint), state)
        self.sha256 = sha256_of(checkpoint_path(checkpoint))
        self.channels_last = channels_last
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = normalize(torch.from_numpy(np.array(images)))  # a copy: arrays from Pillow are read-only
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return torch.sigmoid(self.model(x)).numpy()


def _export_in_child(checkpoint: str, path: str, errors) -> None:
    try:
        from lesionseg.train.export import export_onnx  # in the spawned child only

        export_onnx(checkpoint, path)
    except LesionsegError as exc:
        errors.put(str(exc))
    except Exception as exc:  # reported to the parent as one line; the child's traceback helps no user
        errors.put(f"{checkpoint}: export failed ({exc.__class__.__name__}: {exc})")


def exported_predictor(checkpoint: str | os.PathLike) -> OnnxPredictor:
    """The checkpoint exported to a temporary ONNX file and loaded by onnxruntime (the file is not kept).
    The export runs in a spawned child calling `export_onnx`, so PyTorch never enters this process: a server
    holds ~0.3 GB, not ~1.3."""
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
        predictor = OnnxPredictor(path)
        predictor.sha256 = sha256_of(checkpoint_path(checkpoint))  # the checkpoint's, not the temporary file's
        return predictor
