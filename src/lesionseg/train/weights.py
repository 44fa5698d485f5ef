"""Where the encoder's ImageNet weights come from, first found wins, all offline but the last:
`--weights FILE`, then $LESIONSEG_WEIGHTS, then torchvision's API (`MobileNet_V2_Weights`: its cache, then a
download). The model module does no I/O; this one reads the files and says where they came from."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.error import URLError

import torch
from torchvision.models import MobileNet_V2_Weights

from lesionseg.errors import WeightsError
from lesionseg.files import sha256_of

WEIGHTS_ENV = "LESIONSEG_WEIGHTS"  # a path to a mobilenet_v2 state_dict, used when no --weights FILE is given


@dataclass
class EncoderWeights:
    """The encoder's starting point and where it came from, for run.json and the report."""

    state_dict: dict[str, torch.Tensor] | None  # None: from scratch
    source: str  # a file path, "torchvision IMAGENET1K_V1 (<file>)", or "none"
    sha256: str | None = None

    @property
    def pretrained(self) -> bool:
        return self.state_dict is not None

    def describe(self) -> dict[str, Any]:
        return {"pretrained": self.pretrained, "source": self.source, "sha256": self.sha256}


FROM_SCRATCH = EncoderWeights(None, "none")


def torchvision_weights() -> EncoderWeights:
    """torchvision's ImageNet weights: read from $TORCH_HOME/hub/checkpoints or downloaded once."""
    weights = MobileNet_V2_Weights.IMAGENET1K_V1
    filename = weights.url.rsplit("/", 1)[-1]
    try:
        state = weights.get_state_dict(progress=True, check_hash=True)
    except (URLError, OSError, RuntimeError) as exc:
        raise WeightsError(
            f"ImageNet weights for MobileNetV2 could not be loaded or downloaded ({exc.__class__.__name__}): "
            f"pass --weights FILE or set ${WEIGHTS_ENV} to a mobilenet_v2 state_dict, "
            f"or put {filename} in $TORCH_HOME/hub/checkpoints/ (default ~/.cache/torch), "
            f"or pass --no-pretrained to train from scratch"
        ) from None
    path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    return EncoderWeights(state, f"torchvision IMAGENET1K_V1 ({path})", sha256_of(path) if path.is_file() else None)


def file_weights(path: Path) -> EncoderWeights:
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file; all mean the same to the user
        raise WeightsError(f"{path}: not a readable state_dict ({exc.__class__.__name__})") from None
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: not a state_dict (a {type(state).__name__})")
    return EncoderWeights(state, str(path.resolve()), sha256_of(path))


def imagenet_weights() -> EncoderWeights:
    """ImageNet weights, looked up offline first: ${LESIONSEG_WEIGHTS}, then torchvision's cache or download."""
    env = os.environ.get(WEIGHTS_ENV, "").strip()
    if env:
        if not Path(env).is_file():
            raise WeightsError(f"{env}: weights file not found (from ${WEIGHTS_ENV})")
        return file_weights(Path(env))
    return torchvision_weights()


def resolve_weights(weights: str | None) -> EncoderWeights:
    """ "imagenet": the lookup above, or its one-line error; "auto": the same, but from scratch with a loud
    warning when nothing can be had (the demo); "none": from scratch; anything else: a state_dict file."""
    if weights in ("none", "", None):
        return FROM_SCRATCH
    if weights == "imagenet":
        return imagenet_weights()
    if weights == "auto":
        try:
            return imagenet_weights()
        except WeightsError as exc:
            print(
                f"lesionseg: WARNING: no ImageNet weights ({exc}); the encoder trains FROM SCRATCH and "
                "Model 1 (frozen encoder) will be meaningless",
                file=sys.stderr,
            )
            return FROM_SCRATCH
    return file_weights(Path(weights))
