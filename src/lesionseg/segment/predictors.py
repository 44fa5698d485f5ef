"""Predictors for exported models: uint8 images (B,3,S,S) at the model's size -> lesion probabilities (B,1,S,S),
NumPy in and out, in onnxruntime or OpenVINO (the released model included: no PyTorch needed). A checkpoint's
predictor lives with training (`lesionseg.train.predictor`).
"""

from __future__ import annotations

import math
import os
import threading
from importlib import resources
from importlib.util import find_spec
from pathlib import Path

import numpy as np

from lesionseg.errors import LesionsegError
from lesionseg.files import bounded, sha256_of, shown
from lesionseg.segment.quality import METADATA_KEY as QUALITY_KEY
from lesionseg.segment.quality import QualityModel

RELEASED_MODEL = "release/lesionseg-unet.onnx"  # inside the package; see MODEL_CARD.md
RELEASED_INT8 = "release/lesionseg-unet-int8.onnx"  # the same model quantized (`lesionseg export --int8`)
OPENVINO_EXTRA = "pip install 'lesionseg[openvino]'"
IMAGE_SIZES = range(32, 1024 + 1, 32)  # a model's input size: the encoder halves it five times
MAX_NAME = 200  # characters: a name is shown on the page and in every reply of the service
PRECISIONS = ("float32", "int8", "bf16")  # inference: float32 in onnxruntime; int8 and bf16 in OpenVINO
BORDER_OFFSET_KEY = "border_offset"  # the outline moved out (+) or in (-) by this share of the lesion's radius
MAX_BORDER_OFFSET = 0.5
MODEL_CHECK_BYTES = 1536 * 2**20  # what loading and one dry run of a model may take (the release U-Net: ~0.1 GB)


def metadata_problem(metadata: dict[str, str]) -> str | None:
    """What is wrong with an exported model's metadata, if anything: its size and threshold decide every
    array the pipeline makes, and its name and version are echoed in every reply."""
    if "image_size" not in metadata:
        return "not exported by lesionseg (no image_size in its metadata)"
    try:
        size, threshold = int(metadata["image_size"]), float(metadata.get("threshold", "nan"))
    except ValueError:
        return f"metadata image_size {metadata['image_size'][:20]!r} or threshold is not a number"
    if size not in IMAGE_SIZES:
        return f"metadata image_size {size} is not a multiple of 32 from 32 to 1024"
    if not 0 < threshold < 1:
        return "metadata threshold missing or not in (0, 1)"
    try:
        offset = float(metadata.get(BORDER_OFFSET_KEY, "0"))
    except ValueError:
        offset = math.nan
    if not abs(offset) <= MAX_BORDER_OFFSET:
        return f"metadata {BORDER_OFFSET_KEY} is not a number in [-{MAX_BORDER_OFFSET}, {MAX_BORDER_OFFSET}]"
    for key in ("name", "version"):
        if len(metadata.get(key, "")) > MAX_NAME:
            return f"metadata {key} is {len(metadata[key]):,} characters; at most {MAX_NAME}"
    try:
        QualityModel.from_metadata(metadata.get(QUALITY_KEY))
    except ValueError as exc:
        return str(exc)
    return None


def graph_problem(session, size: int) -> str | None:
    """What keeps the graph from being a lesionseg model: one float input `image` (dynamic batch, 3, S, S)
    and an answer of probabilities (N, 1, S, S), tried once on two grey images."""
    inputs = session.get_inputs()
    if [i.name for i in inputs] != ["image"] or inputs[0].type != "tensor(float)":
        return f"inputs {[(i.name, i.type) for i in inputs]}; expected one float tensor named 'image'"
    shape = inputs[0].shape
    if (
        len(shape) != 4
        or shape[1] != 3
        or isinstance(shape[0], int)
        or any(d not in (size, None) and isinstance(d, int) for d in shape[2:])
    ):
        return f"input shape {shape}; expected (batch, 3, {size}, {size}) with a dynamic batch"
    answer = session.run(None, {"image": np.full((2, 3, size, size), 0.5, np.float32)})[0]
    if answer.shape != (2, 1, size, size):
        return f"answers shape {answer.shape} for 2 images of {size} px; expected (2, 1, {size}, {size})"
    if not (np.isfinite(answer).all() and 0 <= answer.min() and answer.max() <= 1):
        return "answers values outside [0, 1]: not probabilities"
    return None


def session_options(threads: int | None = None, quiet: bool = False):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if quiet:  # the check reports a failure itself, in one line
        options.log_severity_level = 4
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    return options


def open_session(path: Path, threads: int | None = None, quiet: bool = False):
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), session_options(threads, quiet), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own types for a foreign or damaged file
        raise LesionsegError(f"{path}: not a readable ONNX model ({exc.__class__.__name__})") from None


def model_problem(path: Path) -> str | None:
    """Load and try the model once; run inside `bounded` so that a graph built to exhaust memory cannot."""
    try:
        session = open_session(path, threads=1, quiet=True)
    except LesionsegError as exc:
        return str(exc).removeprefix(f"{path}: ")
    metadata = session.get_modelmeta().custom_metadata_map
    return metadata_problem(metadata) or graph_problem(session, int(metadata["image_size"]))


class OnnxPredictor:
    """An exported model run by onnxruntime; size, threshold, name and version come from the file's metadata,
    all checked (with one dry run under a memory bound) before the model is used."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise LesionsegError(f"{shown(path)}: ONNX model not found")
        problem = bounded(lambda: model_problem(path), MODEL_CHECK_BYTES)
        if problem:
            raise LesionsegError(f"{shown(path)}: {problem}")
        self.session = open_session(path, threads)
        self.metadata = self.session.get_modelmeta().custom_metadata_map
        self.image_size, self.threshold = int(self.metadata["image_size"]), float(self.metadata["threshold"])
        self.border_offset = float(self.metadata.get(BORDER_OFFSET_KEY, "0"))  # checked above; adapt fits it
        self.name = self.metadata.get("name", f"{self.metadata.get('arch', 'model')} ({self.image_size} px)")
        self.version = self.metadata.get("version", path.name)
        self.quality = QualityModel.from_metadata(self.metadata.get(QUALITY_KEY))  # checked above
        self.sha256 = sha256_of(path)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = np.asarray(images, dtype=np.float32) / 255
        return self.session.run(None, {"image": x})[0]


class OpenVinoPredictor(OnnxPredictor):
    """The same exported file run by OpenVINO, which uses the int8 (VNNI, AMX) and bf16 (AVX512-BF16, AMX)
    instructions of recent CPUs: an int8 file in int8, a float one in bf16 with `precision="bf16"`. The file is
    checked as an OnnxPredictor first (metadata, one dry run under a memory bound)."""

    def __init__(self, path: str | os.PathLike, precision: str = "float32", threads: int | None = None) -> None:
        super().__init__(path, threads)
        del self.session  # checked and read; OpenVINO runs it
        if find_spec("openvino") is None:
            raise LesionsegError(
                f"--precision {precision} runs in OpenVINO, which this installation lacks: {OPENVINO_EXTRA}"
            )
        import openvino as ov

        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        self.output = self.compiled.output(0)
        self.requests = threading.local()  # an infer request serves one thread at a time

    def __call__(self, images: np.ndarray) -> np.ndarray:
        request = getattr(self.requests, "request", None)
        if request is None:
            request = self.requests.request = self.compiled.create_infer_request()
        x = np.asarray(images, dtype=np.float32) / 255
        return request.infer({"image": x})[self.output].copy()


def released_model(precision: str = "float32") -> Path:
    """The model that ships inside the package (ONNX, metadata inside); its int8 file for precision "int8"."""
    path = Path(
        str(resources.files("lesionseg.segment").joinpath(RELEASED_INT8 if precision == "int8" else RELEASED_MODEL))
    )
    if not path.is_file():
        raise LesionsegError(
            f"{path}: the released model is missing from this installation; "
            "pass --checkpoint or --onnx, or reinstall lesionseg"
        )
    return path


def exported_file(path: Path, precision: str = "float32") -> OnnxPredictor:
    """An ONNX file in the runtime `precision` asks for: float32 in onnxruntime; int8 in OpenVINO where installed
    (else onnxruntime, which runs int8 too, more slowly); bf16 in OpenVINO only."""
    if precision not in PRECISIONS:
        raise LesionsegError(f"unknown precision {precision!r}; choose from: {', '.join(PRECISIONS)}")
    if precision == "bf16" or (precision == "int8" and find_spec("openvino") is not None):
        return OpenVinoPredictor(path, precision)
    return OnnxPredictor(path)
