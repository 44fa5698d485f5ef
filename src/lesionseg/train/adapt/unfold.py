"""A trainable model rebuilt from an exported lesionseg ONNX file, so that what ships is also what adapts.

The exporter folds each BatchNorm into the convolution before it (weight scaled, a bias added) and may store the
weights in float16. The rebuild loads every weight by its name, and gives each folded BatchNorm the identity
statistics (mean 0, variance 1 - eps, scale 1) with the folded bias as its shift: in eval mode the model computes
exactly what the file computes. Fine-tuning then keeps BatchNorm in eval mode (`SegmentationModel(freeze_bn=True)`
semantics for the whole network), the usual choice for a few dozen images anyway.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lesionseg.errors import LesionsegError
from lesionseg.segment.predictors import OnnxPredictor
from lesionseg.train.config import TrainConfig, build_config
from lesionseg.train.models import build_model

EXPORT_PREFIX = "model."  # export.ExportWrapper holds the model as `model` beside its normalization
MATCH_TOLERANCE = 2e-3  # the rebuilt model against onnxruntime on random images, in probability


def initializer_weights(path: Path) -> dict[str, np.ndarray]:
    """The file's named weights as float32 arrays, keyed by the PyTorch name they came from."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    weights = {}
    for tensor in proto.graph.initializer:
        name = tensor.name.removesuffix("__fp16")
        if not name.startswith(EXPORT_PREFIX):
            continue
        name = name.removeprefix(EXPORT_PREFIX).replace(".weight_bias", ".bias")
        weights[name] = numpy_helper.to_array(tensor).astype(np.float32)
    return weights


def folded_pairs(model: nn.Module) -> dict[str, str]:
    """{BatchNorm name: the convolution name it follows}: a Conv2d directly before a BatchNorm2d of its width, in
    module order (torchvision's Conv2dNormActivation, our ConvBlock and UpBlock)."""
    pairs, previous = {}, None
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d) and previous is not None:
            conv_name, conv = previous
            if conv.out_channels == module.num_features:
                pairs[name] = conv_name
        if isinstance(module, nn.Conv2d):
            previous = (name, module)
        elif not list(module.children()):  # any other layer between them breaks the pair; containers do not
            previous = None
    return pairs


def unfolded_state(model: nn.Module, weights: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The model's state_dict filled from the file's weights; raises KeyError or ValueError where they differ."""
    state = model.state_dict()
    pairs = folded_pairs(model)
    filled = {}
    for name, tensor in state.items():
        owner, _, kind = name.rpartition(".")
        if owner in pairs:
            conv = pairs[owner]
            value = {
                "weight": np.ones(tensor.shape, np.float32),
                # the folded shift: in the convolution's own bias where it has one, else carried by the BatchNorm
                "bias": weights.get(f"{conv}.bias")
                if model.get_submodule(conv).bias is None
                else np.zeros(tensor.shape, np.float32),
                "running_mean": np.zeros(tensor.shape, np.float32),
                "running_var": np.full(tensor.shape, 1 - model.get_submodule(owner).eps, np.float32),
                "num_batches_tracked": np.zeros((), np.int64),
            }[kind]
        else:
            value = weights.get(name)
        if value is None and ".classifier." in name:  # torchvision's ImageNet head: never run, never exported
            value = tensor.numpy()
        if value is None:
            raise KeyError(name)
        if tuple(value.shape) != tuple(tensor.shape):
            raise ValueError(f"{name}: shape {tuple(value.shape)} in the file, {tuple(tensor.shape)} in the model")
        filled[name] = torch.from_numpy(np.asarray(value)).to(tensor.dtype)
    return filled


def config_of(predictor: OnnxPredictor, weights: dict[str, np.ndarray]) -> TrainConfig:
    """The training config that rebuilds the file's architecture: the release recipe with the file's arch, size
    and threshold; scSE attention where the file has its weights."""
    attention = "scse" if any(".attention." in name for name in weights) else "none"
    return build_config(
        "unet-finetune",
        arch=predictor.metadata.get("arch", "unet"),
        image_size=predictor.image_size,
        threshold=predictor.threshold,
        decoder_attention=attention,
        dropout=0.0,
        weights="none",
        name=predictor.name[:100],
    )


def model_from_onnx(path: str | os.PathLike) -> tuple[nn.Module, TrainConfig, OnnxPredictor]:
    """The file's model in PyTorch (eval mode) and its config, checked against onnxruntime on random images.
    A file that is not a float lesionseg export (an int8 file, another tool's graph) is refused in one line."""
    path = Path(path)
    predictor = OnnxPredictor(path)  # checks the metadata and runs the graph once
    weights = initializer_weights(path)
    try:
        config = config_of(predictor, weights)
    except LesionsegError as exc:  # an arch or size this version does not know: say which file
        raise LesionsegError(f"{path}: {exc}; adapt starts from a float file `lesionseg export` wrote") from None
    try:
        model = build_model(config.arch, None, dropout=0.0, attention=config.decoder_attention)
        model.load_state_dict(unfolded_state(model, weights))
    except (KeyError, ValueError) as exc:
        raise LesionsegError(
            f"{path}: its weights do not rebuild a lesionseg {predictor.metadata.get('arch', '?')} model "
            f"({exc.__class__.__name__}: {str(exc)[:120]}); adapt starts from a float file `lesionseg export` wrote"
        ) from None
    model.eval()
    gap = rebuild_gap(model, predictor)
    if gap > MATCH_TOLERANCE:
        raise LesionsegError(f"{path}: the rebuilt model differs from the file by {gap:.3f} in probability")
    return model, config, predictor


def rebuild_gap(model: nn.Module, predictor: OnnxPredictor, images: int = 2) -> float:
    """Largest probability difference between the rebuilt model and the file, on seeded random images."""
    from lesionseg.train.augmentation import normalize

    size = predictor.image_size
    generator = np.random.default_rng(0)
    x = generator.integers(0, 256, (images, 3, size, size), dtype=np.uint8)
    with torch.inference_mode():
        ours = torch.sigmoid(model(normalize(torch.from_numpy(x)))).numpy()
    return float(np.abs(ours - predictor(x)).max())
