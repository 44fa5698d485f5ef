"""MobileNetV2 encoder + the paper's decoder, our U-Net decoder and smp's. No I/O: weights arrive as tensors
(`lesionseg.weights` reads them).

Encoder contract: `forward(x)` returns a list of feature maps from high to low resolution
(strides 2, 4, 8, 16, 32), and `out_channels` gives their channel counts. Decoders consume that
list. The model returns logits; sigmoid and threshold live in metrics and prediction.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models import mobilenet_v2

from lesionseg.config import ATTENTIONS, DECODERS
from lesionseg.errors import WeightsError

SEED_DECODER_CHANNELS = (512, 256, 64, 32, 16)  # the paper's five decoder blocks
UNET_DECODER_CHANNELS = (256, 128, 64, 32, 16)  # the widths smp's Unet uses, so the comparison is fair


class Weights(Protocol):
    """What the model needs of pretrained weights (`lesionseg.weights.EncoderWeights`, which reads them)."""

    state_dict: dict[str, torch.Tensor] | None
    source: str


def load_backbone(module: nn.Module, weights: Weights | None, drop_prefix: str | None = None) -> None:
    """Pretrained weights into `module`, strictly; `drop_prefix` leaves out keys the module does not have."""
    if weights is None or weights.state_dict is None:
        return
    state = weights.state_dict
    if drop_prefix:
        state = {k: v for k, v in state.items() if not k.startswith(drop_prefix)}
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise WeightsError(f"{weights.source}: not a torchvision mobilenet_v2 state_dict ({first})") from None


class MobileNetV2Encoder(nn.Module):
    """The whole torchvision MobileNetV2 (classifier kept: the paper counts its parameters).

    Feature maps are taken at the last block of each stride: features[1] (stride 2, 16 ch),
    [3] (4, 24), [6] (8, 32), [13] (16, 96) and [18] (32, 1280).
    """

    stage_ends = (1, 3, 6, 13, 18)
    out_channels = (16, 24, 32, 96, 1280)

    def __init__(self, weights: Weights | None = None) -> None:
        super().__init__()
        self.backbone = mobilenet_v2(weights=None)
        load_backbone(self.backbone, weights)

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

    def __init__(self, encoder_channels: tuple[int, ...], dropout: float = 0.2, attention: str = "none") -> None:
        super().__init__()  # the paper's decoder has no attention: `attention` is ignored
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
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
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
        for key in [k for k in state_dict if k.startswith(prefix) and k[len(prefix) :][:1].isdigit()]:
            state_dict[f"{prefix}convs.{key[len(prefix) :]}"] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class UNetDecoder(nn.Module):
    """U-Net decoder on the encoder's feature list: at each stride 16, 8, 4, 2 upsample (bilinear) to the
    skip's exact size, concatenate, UNetDecoderBlock; a last block at full resolution; a 1x1 conv to one logit.

    The skips are the last block of each stride (MobileNetV2 features[13], [6], [3], [1]): the deepest,
    most processed map at that resolution, before the next stride-2 block throws half of it away.
    """

    def __init__(
        self,
        encoder_channels: tuple[int, ...],
        dropout: float = 0.0,
        attention: str = "none",
        channels: tuple[int, ...] = UNET_DECODER_CHANNELS,
    ) -> None:
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
    """segmentation_models_pytorch's Unet decoder and head: the library baseline we compare against. It brings
    its own encoder (torchvision's MobileNetV2 less the classifier), so it builds the pair itself."""

    def __init__(self, smp_model: nn.Module) -> None:
        super().__init__()
        self.decoder = smp_model.decoder
        self.head = smp_model.segmentation_head

    @staticmethod
    def build(weights: Weights | None, dropout: float, attention: str) -> tuple[nn.Module, nn.Module]:
        import segmentation_models_pytorch as smp

        baseline = smp.Unet("mobilenet_v2", encoder_weights=None, classes=1)
        load_backbone(baseline.encoder, weights, drop_prefix="classifier.")
        return baseline.encoder, SmpUnetDecoder(baseline)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.head(self.decoder(features))


class SegmentationModel(nn.Module):
    """encoder -> decoder -> logits.

    A frozen encoder neither learns nor updates BatchNorm statistics; `freeze_bn` keeps only the encoder's
    BatchNorm statistics fixed while its weights fine-tune (small batches of dermoscopy would otherwise
    pull the ImageNet statistics around).
    """

    def __init__(
        self, encoder: nn.Module, decoder: nn.Module, freeze_encoder: bool = False, freeze_bn: bool = False
    ) -> None:
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


def build_model(
    arch: str = "seed",
    weights: Weights | None = None,
    freeze_encoder: bool = False,
    dropout: float = 0.2,
    attention: str = "none",
    freeze_bn: bool = False,
) -> SegmentationModel:
    """The decoder `config.DECODERS` names for `arch` on a MobileNetV2 encoder (from `weights`, else random).
    A decoder class with a `build(weights, dropout, attention)` makes its own encoder (smp's Unet)."""
    if arch not in DECODERS:
        raise ValueError(f"unknown arch {arch!r}; choose from: {', '.join(DECODERS)}")
    decoder_class = globals()[DECODERS[arch]]
    if hasattr(decoder_class, "build"):
        encoder, decoder = decoder_class.build(weights, dropout, attention)
    else:
        encoder = MobileNetV2Encoder(weights)
        decoder = decoder_class(encoder.out_channels, dropout, attention)
    return SegmentationModel(encoder, decoder, freeze_encoder, freeze_bn)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
