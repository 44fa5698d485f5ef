"""MobileNetV2 encoder + the paper's decoder. No I/O here beyond loading pretrained weights.

Encoder contract: `forward(x)` returns a list of feature maps from high to low resolution
(strides 2, 4, 8, 16, 32), and `out_channels` gives their channel counts. Decoders consume that
list. The model returns logits; sigmoid and threshold live in metrics and prediction.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.error import URLError

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

from lesionseg.download import sha256_of
from lesionseg.errors import WeightsError

SEED_DECODER_CHANNELS = (512, 256, 64, 32, 16)  # the paper's five decoder blocks
UNET_DECODER_CHANNELS = (256, 128, 64, 32, 16)  # the widths smp's Unet uses, so the comparison is fair
ARCHS = ("seed", "unet", "smp-unet")
ATTENTIONS = ("none", "scse")  # decoder attention choices for arch unet


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
    """"imagenet": the lookup above, or its one-line error; "auto": the same, but from scratch with a loud
    warning when nothing can be had (the demo); "none": from scratch; anything else: a state_dict file."""
    if weights in ("none", "", None):
        return FROM_SCRATCH
    if weights == "imagenet":
        return imagenet_weights()
    if weights == "auto":
        try:
            return imagenet_weights()
        except WeightsError as exc:
            print(f"lesionseg: WARNING: no ImageNet weights ({exc}); the encoder trains FROM SCRATCH and "
                  "Model 1 (frozen encoder) will be meaningless", file=sys.stderr)
            return FROM_SCRATCH
    return file_weights(Path(weights))


def load_backbone(module: nn.Module, state_dict: dict[str, torch.Tensor] | None, source: str, strict: bool = True) -> None:
    if state_dict is None:
        return
    try:
        module.load_state_dict(state_dict, strict=strict)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise WeightsError(f"{source}: not a torchvision mobilenet_v2 state_dict ({first})") from None


class MobileNetV2Encoder(nn.Module):
    """The whole torchvision MobileNetV2 (classifier kept: the paper counts its parameters).

    Feature maps are taken at the last block of each stride: features[1] (stride 2, 16 ch),
    [3] (4, 24), [6] (8, 32), [13] (16, 96) and [18] (32, 1280).
    """

    stage_ends = (1, 3, 6, 13, 18)
    out_channels = (16, 24, 32, 96, 1280)

    def __init__(self, weights: str | EncoderWeights = FROM_SCRATCH) -> None:
        super().__init__()
        self.backbone = mobilenet_v2(weights=None)
        weights = resolve_weights(weights) if isinstance(weights, str) else weights
        load_backbone(self.backbone, weights.state_dict, weights.source)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B,3,H,W) -> five maps, (B,16,H/2,W/2) ... (B,1280,H/32,W/32)."""
        features = []
        for index, block in enumerate(self.backbone.features):
            x = block(x)
            if index in self.stage_ends:
                features.append(x)
        return features


class UpBlock(nn.Sequential):
    """Conv3x3 -> BatchNorm -> ReLU -> bilinear x2 -> Dropout: one block of the paper's decoder."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Dropout(dropout),
        )


class SeedDecoder(nn.Module):
    """The paper's decoder: five UpBlocks on the stride-32 map only, then a 1x1 conv to one logit."""

    def __init__(self, encoder_channels: tuple[int, ...], dropout: float = 0.2) -> None:
        super().__init__()
        channels = (encoder_channels[-1], *SEED_DECODER_CHANNELS)
        self.blocks = nn.Sequential(*(UpBlock(c_in, c_out, dropout) for c_in, c_out in zip(channels, channels[1:])))
        self.head = nn.Conv2d(channels[-1], 1, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """features[-1] (B,1280,H/32,W/32) -> logits (B,1,H,W)."""
        return self.head(self.blocks(features[-1]))


class ConvBlock(nn.Sequential):
    """Two Conv3x3 -> BatchNorm -> ReLU: mixes upsampled context with the skip's detail."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
        )


def attention(kind: str, channels: int) -> nn.Module:
    """smp's concurrent spatial and channel squeeze-and-excitation (Roy et al. 2018), or nothing."""
    from segmentation_models_pytorch.base.modules import Attention

    if kind not in ATTENTIONS:
        raise ValueError(f"unknown decoder attention {kind!r}; choose from: {', '.join(ATTENTIONS)}")
    return Attention("scse" if kind == "scse" else None, in_channels=channels)


class UNetDecoderBlock(nn.Module):
    """attention on [upsampled context, skip] -> ConvBlock -> attention on the result.

    With "scse" the block reweights channels (which skip or context features matter) and pixels
    (where the lesion border is) before and after mixing them; "none" is a plain U-Net block.
    """

    def __init__(self, in_channels: int, out_channels: int, kind: str = "none") -> None:
        super().__init__()
        self.attend_input = attention(kind, in_channels)
        self.convs = ConvBlock(in_channels, out_channels)
        self.attend_output = attention(kind, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attend_output(self.convs(self.attend_input(x)))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """Checkpoints written before attention existed keep the convs directly under the block: rename."""
        for key in [k for k in state_dict if k.startswith(prefix) and k[len(prefix):][:1].isdigit()]:
            state_dict[f"{prefix}convs.{key[len(prefix):]}"] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class UNetDecoder(nn.Module):
    """U-Net decoder on the encoder's feature list: at each stride 16, 8, 4, 2 upsample (bilinear) to the
    skip's exact size, concatenate, UNetDecoderBlock; a last block at full resolution; a 1x1 conv to one logit.

    The skips are the last block of each stride (MobileNetV2 features[13], [6], [3], [1]): the deepest,
    most processed map at that resolution, before the next stride-2 block throws half of it away.
    """

    def __init__(self, encoder_channels: tuple[int, ...], channels: tuple[int, ...] = UNET_DECODER_CHANNELS,
                 dropout: float = 0.0, attention: str = "none") -> None:
        super().__init__()
        skips = encoder_channels[-2::-1]
        inputs = [encoder_channels[-1], *channels[:-1]]
        self.blocks = nn.ModuleList(
            UNetDecoderBlock(c_in + (skips[i] if i < len(skips) else 0), c_out, attention)
            for i, (c_in, c_out) in enumerate(zip(inputs, channels))
        )
        self.dropout = nn.Dropout2d(dropout)
        self.head = nn.Conv2d(channels[-1], 1, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Five maps (strides 2..32) -> logits (B,1,2H2,2W2) where (H2,W2) is the stride-2 map's size."""
        x, skips = features[-1], features[-2::-1]
        for i, block in enumerate(self.blocks):
            if i < len(skips):
                x = F.interpolate(x, size=skips[i].shape[-2:], mode="bilinear", align_corners=False)
                x = torch.cat([x, skips[i]], dim=1)
            else:
                x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            x = block(x)
        return self.head(self.dropout(x))


class SmpUnetDecoder(nn.Module):
    """segmentation_models_pytorch's Unet decoder and head: the library baseline we compare against."""

    def __init__(self, smp_model: nn.Module) -> None:
        super().__init__()
        self.decoder = smp_model.decoder
        self.head = smp_model.segmentation_head

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.head(self.decoder(features))


class SegmentationModel(nn.Module):
    """encoder -> decoder -> logits.

    A frozen encoder neither learns nor updates BatchNorm statistics; `freeze_bn` keeps only the encoder's
    BatchNorm statistics fixed while its weights fine-tune (small batches of dermoscopy would otherwise
    pull the ImageNet statistics around).
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, freeze_encoder: bool = False,
                 freeze_bn: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.freeze_bn = freeze_bn
        self.freeze_encoder = False
        self.set_encoder_frozen(freeze_encoder)

    def set_encoder_frozen(self, frozen: bool) -> None:
        """Freeze or unfreeze the encoder (the decoder warm-up of `--unfreeze-after` flips it once)."""
        self.freeze_encoder = frozen
        self.encoder.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> SegmentationModel:
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()  # keep BatchNorm running statistics fixed too
        elif self.freeze_bn:
            for module in self.encoder.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) normalized images -> (B,1,H,W) logits."""
        return self.decoder(self.encoder(x))


def build_model(arch: str = "seed", weights: str | EncoderWeights = "imagenet", freeze_encoder: bool = False,
                dropout: float = 0.2, attention: str = "none", freeze_bn: bool = False) -> SegmentationModel:
    """seed: the paper's decoder; unet: ours with skips (`attention` in its blocks);
    smp-unet: smp.Unet("mobilenet_v2") as it ships (no attention, nearest upsampling).
    `weights` is resolved by `resolve_weights` when given by name."""
    if isinstance(weights, str):
        weights = resolve_weights(weights)
    if arch == "smp-unet":
        import segmentation_models_pytorch as smp

        baseline = smp.Unet("mobilenet_v2", encoder_weights=None, classes=1)
        state = weights.state_dict  # smp's encoder is torchvision's MobileNetV2 less the classifier
        if state is not None:
            state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        load_backbone(baseline.encoder, state, weights.source)
        return SegmentationModel(baseline.encoder, SmpUnetDecoder(baseline), freeze_encoder, freeze_bn)
    encoder = MobileNetV2Encoder(weights)
    if arch == "seed":
        decoder: nn.Module = SeedDecoder(encoder.out_channels, dropout)
    elif arch == "unet":
        decoder = UNetDecoder(encoder.out_channels, dropout=dropout, attention=attention)
    else:
        raise ValueError(f"unknown arch {arch!r}; choose from: {', '.join(ARCHS)}")
    return SegmentationModel(encoder, decoder, freeze_encoder, freeze_bn)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
