"""The Python API: `lesionseg.load(...).segment(...)`. No PyTorch needed for the released or an ONNX model."""

from __future__ import annotations

import os
from importlib.util import find_spec
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

from lesionseg.errors import DataError, LesionsegError, require_torch
from lesionseg.images import check_pixels, checked_pil
from lesionseg.segment.clicks import Clicker
from lesionseg.segment.descriptors import describe
from lesionseg.segment.pipeline import (
    Pipeline,
    Predictor,  # noqa: E402
    Refinements,
    Segmentation,
    model_input,
    read_for_model,
)
from lesionseg.segment.predictors import exported_file, released_model

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]


def as_image(item: ImageInput, index: int, size: int) -> tuple[Image.Image, tuple[int, int], str]:
    """An RGB PIL image (reduced where the format allows), its full (width, height) and a name, from a path (read
    under the shared image policy), a PIL image or an HxWx3 uint8 array."""
    if isinstance(item, (str, os.PathLike)):
        image, full, _ = read_for_model(Path(item), str(item), size)
        return image, full, str(item)
    if isinstance(item, Image.Image):
        name = getattr(item, "filename", "") or f"image {index}"
        image = checked_pil(item, name)
        return image, image.size, name
    if isinstance(item, np.ndarray):
        if item.ndim != 3 or item.shape[2] != 3 or item.dtype != np.uint8:
            raise DataError(f"image {index}: an array must be HxWx3 uint8 RGB, got shape {item.shape} {item.dtype}")
        check_pixels(item.shape[1], item.shape[0], f"image {index}")
        return Image.fromarray(item), (item.shape[1], item.shape[0]), f"image {index}"
    raise DataError(f"image {index}: expected a path, a PIL image or an HxWx3 uint8 array, got {type(item).__name__}")


class Segmenter:
    """A model loaded once, segmenting any number of images. Get one with `lesionseg.load()`."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.clicks = Clicker()  # the click model, loaded at the first `refine`

    @property
    def name(self) -> str:
        return self.pipeline.name

    @property
    def version(self) -> str:
        return self.pipeline.version

    def segment(self, images: ImageInput | list[ImageInput], batch_size: int = 16) -> Segmentation | list[Segmentation]:
        """One result for one input, a list for a list. Each has `.mask` (H,W bool, the image's own size),
        `.probability` (H,W float32) and `.stats` (area, bounding box, mean probability)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        results = []
        for start in range(0, len(items), batch_size):
            opened = [
                as_image(item, start + n, self.pipeline.image_size)
                for n, item in enumerate(items[start : start + batch_size])
            ]
            results += self.pipeline.segment(
                [im for im, _, _ in opened], [name for _, _, name in opened], [size for _, size, _ in opened]
            )
        return results[0] if single else results

    def refine(
        self,
        image: ImageInput,
        positive: list[tuple[float, float]] | None = None,
        negative: list[tuple[float, float]] | None = None,
        mask: np.ndarray | None = None,
    ) -> Segmentation:
        """The mask corrected by clicks, (x, y) in the image's own pixels: a positive click adds what the model
        missed, a negative one removes what it took; `mask` (H,W bool) is the mask they correct (None: from
        nothing). A result like `segment`'s, from the click model that ships beside the release
        ($LESIONSEG_CLICK_MODEL names another)."""
        picture, size, name = as_image(image, 0, self.clicks.image_size)
        try:
            probability = self.clicks.corrected(
                model_input(picture, self.clicks.image_size), size, positive, negative, mask
            )
        except DataError as exc:
            raise DataError(f"{name}: {exc}") from None
        result = self.pipeline.result(probability, size, name)
        result.descriptors = describe(picture, result.mask)
        return result


def load(
    model: str | os.PathLike | None = None,
    tta: bool = False,
    largest_component: bool = False,
    fill_holes: bool = False,
    precision: str = "float32",
) -> Segmenter:
    """The released model (no argument), an exported `.onnx` file, or a checkpoint / run folder. `tta`: each
    answer is the mean over flips (3 model calls per image); `largest_component`, `fill_holes`: the refinements
    `evaluate` scores; `precision`: "int8" (the released int8 file, in OpenVINO where installed) or "bf16"
    (OpenVINO), for CPUs with int8 or bf16 instructions."""
    refine = Refinements(tta=tta, largest_component=largest_component, fill_holes=fill_holes)
    return Segmenter(Pipeline(load_any(model, precision), refine))


def load_predictor(
    checkpoint: str | os.PathLike | None = None,
    onnx: str | os.PathLike | None = None,
    backend: str = "torch",
    precision: str = "float32",
) -> Predictor:
    """A checkpoint, an ONNX file, or with neither the released model (its int8 file for precision "int8").
    A checkpoint runs in PyTorch, or with backend "onnxruntime" exported and run there ("auto": onnxruntime if
    installed); only exported files run in int8 or bf16. Training's code is imported only for a checkpoint."""
    if checkpoint and onnx:
        raise LesionsegError("give either --checkpoint CKPT or --onnx MODEL, not both")
    if not checkpoint:
        return exported_file(Path(onnx) if onnx else released_model(precision), precision)
    if precision != "float32":
        raise LesionsegError(
            f"{checkpoint}: --precision {precision} runs exported files; "
            f"`lesionseg export {'--int8 ' if precision == 'int8' else ''}--checkpoint ... --onnx FILE` first"
        )
    require_torch(f"{checkpoint}: running a checkpoint")
    from lesionseg.train.predictor import TorchPredictor, exported_predictor

    if backend == "onnxruntime" or (backend == "auto" and find_spec("onnxruntime") is not None):
        return exported_predictor(checkpoint)
    return TorchPredictor(checkpoint)


def load_any(model: str | os.PathLike | None, precision: str = "float32") -> Predictor:
    """The released model (None), an `.onnx` file, or a checkpoint / run folder (in PyTorch)."""
    if model is not None and not str(model).strip():
        raise LesionsegError("empty model path: pass nothing for the released model, or a file or run folder")
    if model is None or Path(model).suffix.lower() == ".onnx":
        return load_predictor(onnx=model, precision=precision)
    return load_predictor(checkpoint=model, precision=precision)
