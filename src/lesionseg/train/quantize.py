"""int8 ONNX models for CPUs with int8 dot products (AVX-512 VNNI): onnxruntime's static quantization,
calibrated on training images only. Which recipe holds accuracy was measured, not assumed
(benchmarks/int8.py, benchmarks/README.md "int8"); `DEFAULT_RECIPE` is the one that did.
"""

from __future__ import annotations

import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lesionseg.errors import DataError, LesionsegError

CALIBRATIONS = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class Int8Recipe:
    """How to quantize: per-channel weight scales, the activation-range method, how many calibration
    images, which layers stay float32, and the graph format (QDQ pairs, or QLinear operators)."""

    per_channel: bool = True
    calibration: str = "minmax"
    images: int = 128
    keep_float: tuple[str, ...] = ()  # any of "first_conv", "last_conv", "resize"
    format: str = "qdq"
    op_types: tuple[str, ...] = ()  # only these operator types in int8 (e.g. Conv); () = all onnxruntime can

    def describe(self) -> str:
        kept = "+".join(self.keep_float) or "none"
        ops = "+".join(self.op_types) or "all"
        return (
            f"{self.format}, {'per-channel' if self.per_channel else 'per-tensor'} weights, {self.calibration} "
            f"ranges from {self.images} training images, int8 ops: {ops}, float32 kept: {kept}"
        )


DEFAULT_RECIPE = Int8Recipe(calibration="percentile")  # chosen on validation images: benchmarks/README.md, "int8"


def training_images(
    folder: str | os.PathLike,
    count: int,
    size: int,
    seed: int = 0,
    exclude: frozenset[str] = frozenset(),
    cache_dir: str | None = None,
) -> np.ndarray:
    """uint8 (N,3,S,S): `count` images drawn (seeded) from a dataset's training split, leaving out the ids in
    `exclude` (a run's validation images, kept for choosing between recipes). They come from the resize cache
    training filled, so they are the very pixels the model learnt from, and nothing is decoded twice."""
    from lesionseg.train.data import load_split

    try:
        split = load_split(folder, "train", size, cache_dir, quiet=True)
    except DataError as exc:
        raise DataError(f"{folder}: no training images to calibrate int8 on ({exc})") from None
    allowed = [n for n, image_id in enumerate(split.ids) if image_id not in exclude]
    chosen = random.Random(seed).sample(allowed, min(count, len(allowed)))
    return split.images[chosen].numpy()


def float_node_names(model, roles: tuple[str, ...]) -> list[str]:
    """Names of the nodes that play each role: the first and last convolution, every bilinear upsampling."""
    convs = [node.name for node in model.graph.node if node.op_type == "Conv"]
    names = []
    if "first_conv" in roles:
        names.append(convs[0])
    if "last_conv" in roles:
        names.append(convs[-1])
    if "resize" in roles:
        names += [node.name for node in model.graph.node if node.op_type == "Resize"]
    return names


def quantize_int8(
    fp32_path: str | os.PathLike, out_path: str | os.PathLike, images: np.ndarray, recipe: Int8Recipe = DEFAULT_RECIPE
) -> Path:
    """Write the int8 model of an exported float32 lesionseg model. `images`: uint8 (N,3,S,S) training
    images for the activation ranges. Metadata is carried over, with the recipe and `precision: int8`."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import CalibrationDataReader
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if recipe.calibration not in CALIBRATIONS:
        raise LesionsegError(f"int8 calibration must be one of {', '.join(CALIBRATIONS)}, not {recipe.calibration!r}")

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(np.array_split(images.astype(np.float32) / 255, max(1, len(images) // 16)))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"image": batch}

    out_path = Path(out_path)
    original = onnx.load(str(fp32_path))
    with tempfile.TemporaryDirectory() as folder:
        prepared = Path(folder) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))  # shape inference and graph clean-up, as the docs advise
        method = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }[recipe.calibration]
        quantized = Path(folder) / "int8.onnx"
        quantize_static(
            str(prepared),
            str(quantized),
            Batches(),
            quant_format=QuantFormat.QDQ if recipe.format == "qdq" else QuantFormat.QOperator,
            per_channel=recipe.per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=method,
            op_types_to_quantize=list(recipe.op_types) or None,
            nodes_to_exclude=float_node_names(onnx.load(str(prepared)), recipe.keep_float),
        )
        model = onnx.load(str(quantized))
    props = {p.key: p.value for p in original.metadata_props}
    props.update(
        precision="int8",
        int8_recipe=recipe.describe(),
        weights_storage="int8",
        version=f"{props.get('version', fp32_path)}, int8",
        name=f"{props.get('name', 'model')} int8",
    )
    onnx.helper.set_model_props(model, props)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".onnx.tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, out_path)
    return out_path
