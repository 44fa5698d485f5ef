"""ONNX export: normalization and sigmoid inside the graph, so a user feeds RGB in [0, 1]."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lesionseg.errors import LesionsegError
from lesionseg.files import output_folder, shown, write_atomically
from lesionseg.train.checkpoint import load_model
from lesionseg.train.models import IMAGENET_MEAN, IMAGENET_STD
from lesionseg.train.rundir import checkpoint_path
from lesionseg.version import __version__

INPUT_DOC = "image: float32 (batch, 3, S, S), RGB scaled to [0, 1]; probability: float32 (batch, 1, S, S)"


class ExportWrapper(nn.Module):
    """RGB in [0,1] -> ImageNet normalization -> model -> sigmoid probability."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model((image - self.mean) / self.std))


def store_weights_fp16(proto) -> None:
    """Halve the file: each float32 weight is stored as float16 and cast back by a Cast node, which onnxruntime
    folds into a float32 constant when it loads the model, so inference still computes in float32."""
    import onnx
    from onnx import TensorProto, numpy_helper

    casts = []
    for weight in proto.graph.initializer:
        if weight.data_type != TensorProto.FLOAT or np.prod(weight.dims) < 16:  # scalars and tiny vectors stay exact
            continue
        name = weight.name
        weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight).astype(np.float16), f"{name}__fp16"))
        casts.append(onnx.helper.make_node("Cast", [f"{name}__fp16"], [name], to=TensorProto.FLOAT))
    nodes = casts + list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)


def exported_by_lesionseg(path: Path) -> bool:
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # not ONNX at all
        return False
    return any(p.key == "image_size" for p in proto.metadata_props)


def check_target(checkpoint: str | os.PathLike, path: Path) -> None:
    """Before any work: the output is a .onnx file that is neither the input nor anyone else's file (an earlier
    export may be replaced), in a folder that can be written."""
    if path.suffix.lower() != ".onnx":
        raise LesionsegError(f"{shown(path)}: the exported model's name must end in .onnx")
    source = checkpoint_path(checkpoint)
    if path.exists():
        if path.is_dir() or (source.exists() and os.path.samefile(path, source)):
            raise LesionsegError(f"{shown(path)}: is the checkpoint itself or a folder; choose another --onnx")
        if not exported_by_lesionseg(path):
            raise LesionsegError(f"{shown(path)}: exists and is not a model lesionseg exported; not replaced")
    output_folder(path.parent)


def export_onnx(
    checkpoint: str | os.PathLike,
    path: str | os.PathLike,
    fp16_weights: bool = False,
    metadata: dict[str, str] | None = None,
    quick: bool = False,
) -> Path:
    """One self-contained .onnx file with a dynamic batch axis and lesionseg metadata (plus `metadata`). `quick`:
    PyTorch's TorchScript exporter, about 1 s where the dynamo exporter takes 25 s on 2 cores, the same numbers
    within 1e-4 (tests/test_export.py): what adapt uses to stay within its 2 minutes; releases use dynamo."""
    import onnx

    path = Path(path)
    check_target(checkpoint, path)
    model, config, state = load_model(checkpoint)
    example = torch.rand(2, 3, config.image_size, config.image_size)
    if quick:
        proto = traced_proto(ExportWrapper(model).eval(), example)
    else:
        batch = torch.export.Dim("batch", min=1, max=4096)
        program = torch.onnx.export(
            ExportWrapper(model).eval(),
            (example,),
            dynamo=True,
            external_data=False,
            verbose=False,
            input_names=["image"],
            output_names=["probability"],
            dynamic_shapes={"image": {0: batch}},
        )
        proto = program.model_proto
    props = {p.key: p.value for p in proto.metadata_props}
    props.update(
        image_size=str(config.image_size),
        threshold=str(config.threshold),
        arch=config.arch,
        io=INPUT_DOC,
        name=config.model_name,
        version=f"{Path(checkpoint).name}, epoch {state.get('epoch', '?')}, lesionseg {__version__}",
        weights_storage="float16" if fp16_weights else "float32",
    )
    props.update(metadata or {})  # the caller's values win, name and version included
    if fp16_weights:
        store_weights_fp16(proto)
    onnx.helper.set_model_props(proto, props)
    return write_atomically(path, lambda handle: handle.write(proto.SerializeToString()), "ONNX model")


def traced_proto(wrapper: torch.nn.Module, example: torch.Tensor):
    """The model through the TorchScript exporter, as an ONNX proto with a dynamic batch axis."""
    import io
    import warnings

    import onnx

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            wrapper, (example,), buffer, dynamo=False, input_names=["image"], output_names=["probability"],
            dynamic_axes={"image": {0: "batch"}, "probability": {0: "batch"}}, opset_version=18,
        )  # fmt: skip
    return onnx.load_from_string(buffer.getvalue())


def float16_copy(fp32_path: Path, path: Path) -> Path:
    """The exported float32 file with its weights stored as float16 (`store_weights_fp16`): what `export_onnx(...,
    fp16_weights=True)` writes, without exporting the model a second time."""
    import onnx

    proto = onnx.load(str(fp32_path))
    store_weights_fp16(proto)
    props = {p.key: p.value for p in proto.metadata_props} | {"weights_storage": "float16"}
    onnx.helper.set_model_props(proto, props)
    return write_atomically(path, lambda handle: handle.write(proto.SerializeToString()), "ONNX model")


def export_int8(
    checkpoint: str | os.PathLike,
    path: str | os.PathLike,
    calibration_data: str | os.PathLike | None = None,
    calibration_images: int | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """The checkpoint as an int8 ONNX model (`quantize.DEFAULT_RECIPE`), its activation ranges calibrated on
    training images drawn from `calibration_data`, else from the folder the checkpoint was trained on; `metadata` as
    for `export_onnx` (name and version get ", int8"). Adapt, which holds its images, uses `int8_twin`."""
    import tempfile
    from dataclasses import replace

    from lesionseg.train.data import resolve_data_dir
    from lesionseg.train.quantize import DEFAULT_RECIPE, quantize_int8, training_images

    check_target(checkpoint, Path(path))
    config = load_model(checkpoint)[1]
    recipe = replace(DEFAULT_RECIPE, images=calibration_images or DEFAULT_RECIPE.images)
    images = training_images(
        resolve_data_dir(calibration_data or config.data), recipe.images, config.image_size, cache_dir=config.cache_dir
    )
    with tempfile.TemporaryDirectory() as folder:
        fp32 = export_onnx(checkpoint, Path(folder) / "fp32.onnx", metadata=metadata)
        return quantize_int8(fp32, path, images, recipe)


def int8_twin(fp32_path: Path, path: Path, calibration_pixels: np.ndarray) -> Path:
    """The int8 model of an already exported float32 file, calibrated on uint8 (N,3,S,S) images in memory."""
    from lesionseg.train.quantize import DEFAULT_RECIPE, quantize_int8

    return quantize_int8(fp32_path, path, calibration_pixels[: DEFAULT_RECIPE.images], DEFAULT_RECIPE)
