"""MobileNetV2 encoder + the paper's decoder, our U-Net decoder and smp's. No I/O: weights arrive as tensors
(`lesionseg.train.weights` reads them).

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

from lesionseg.errors import WeightsError
from lesionseg.train.config import ATTENTIONS, DECODERS

SEED_DECODER_CHANNELS = (512, 256, 64, 32, 16)  # the paper's five decoder blocks
UNET_DECODER_CHANNELS = (256, 128, 64, 32, 16)  # the widths smp's Unet uses, so the comparison is fair

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the statistics the ImageNet encoder was trained with
IMAGENET_STD = (0.229, 0.224, 0.225)


class Weights(Protocol):
    """What the model needs of pretrained weights (`lesionseg.train.weights.EncoderWeights`, which reads them)."""

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


class Float32Conv2d(nn.Conv2d):
    """A convolution that runs in float32 under CPU autocast. oneDNN's bfloat16 backward of MobileNetV2's stride-2
    depthwise convolutions is 5-20x slower than its float32 one (benchmarks/README.md, "Training speed"), while
    every other layer gains from bf16; same parameters, so checkpoints and exports are unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


def strided_depthwise_in_float32(backbone: nn.Module) -> None:
    """Make each stride-2 depthwise convolution of the backbone a Float32Conv2d (in place, parameters kept)."""
    for module in backbone.modules():
        if isinstance(module, nn.Conv2d) and module.groups > 1 and module.stride != (1, 1):
            module.__class__ = Float32Conv2d


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
        strided_depthwise_in_float32(self.backbone)

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


class ChannelsLastGradient(torch.autograd.Function):
    """Identity whose gradient is made channels_last-contiguous. torch.cat's backward hands each input a channel
    slice of its gradient, contiguous in neither layout, and upsample_bilinear2d's backward then takes its slow
    NCHW path: 3x slower at 64x64 (benchmarks/README.md, "Training speed")."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous(memory_format=torch.channels_last)


def upsample(x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Bilinear upsampling to `size` (or x2); in channels_last training, with a channels_last gradient."""
    y = F.interpolate(x, size=size, scale_factor=None if size else 2, mode="bilinear", align_corners=False)
    if torch.is_grad_enabled() and y.requires_grad and y.is_contiguous(memory_format=torch.channels_last):
        y = ChannelsLastGradient.apply(y)
    return y


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
                x = torch.cat([upsample(x, skips[i].shape[-2:]), skips[i]], dim=1)
            else:
                x = upsample(x)
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


def shades_of_gray(x: torch.Tensor, p: float = 6.0) -> torch.Tensor:
    """Colour constancy (Finlayson and Trezzi 2004; p = 6 as in many ISIC challenge entries) on ImageNet-normalized
    images: each image's illuminant, the p-norm of each channel, is divided out so that the light looks white.
    In float32 inside the model, so the exported ONNX file does it too."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    rgb = (x.float() * std + mean).clamp(0, 1)
    illuminant = rgb.pow(p).mean(dim=(-2, -1), keepdim=True).pow(1 / p)
    illuminant = illuminant / illuminant.norm(dim=1, keepdim=True).clamp_min(1e-6)
    balanced = (rgb / (illuminant * 3**0.5).clamp_min(1e-6)).clamp(0, 1)
    return ((balanced - mean) / std).to(x.dtype)


class SegmentationModel(nn.Module):
    """[colour constancy ->] encoder -> decoder -> logits.

    A frozen encoder neither learns nor updates BatchNorm statistics; `freeze_bn` keeps only the encoder's
    BatchNorm statistics fixed while its weights fine-tune (small batches of dermoscopy would otherwise
    pull the ImageNet statistics around).
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        freeze_encoder: bool = False,
        freeze_bn: bool = False,
        colour_constancy: bool = False,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.freeze_bn = freeze_bn
        self.colour_constancy = colour_constancy
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
        if self.colour_constancy:
            x = shades_of_gray(x)
        return self.decoder(self.encoder(x))


def build_model(
    arch: str = "seed",
    weights: Weights | None = None,
    freeze_encoder: bool = False,
    dropout: float = 0.2,
    attention: str = "none",
    freeze_bn: bool = False,
    colour_constancy: bool = False,
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
    return SegmentationModel(encoder, decoder, freeze_encoder, freeze_bn, colour_constancy)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
