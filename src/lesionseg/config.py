"""One configuration object for a training run, built from a preset plus command-line overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from lesionseg.errors import LesionsegError

PAPER_PRESETS = ("model1-frozen", "model2-finetune")
PRESETS = (*PAPER_PRESETS, "unet-finetune")
ARCHS = ("seed", "unet", "smp-unet")
ATTENTIONS = ("none", "scse")


class ConfigError(LesionsegError):
    """A preset or override that cannot make a valid configuration."""


@dataclass
class TrainConfig:
    """Everything that decides what a training run does; saved as `config.yaml` beside the run."""

    name: str = "run"
    arch: str = "seed"  # "seed": the paper's decoder on the 4x4 bottleneck
    freeze_encoder: bool = False
    loss: dict[str, float] = field(default_factory=lambda: {"bce": 1.0})
    data: str | None = None  # None: the embedded sample
    extra_data: list[str] = field(default_factory=list)  # more folders of pairs, added to training only (never validation)
    out: str = "runs/run"
    image_size: int = 128
    epochs: int = 40
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"  # "adam" | "adamw"
    schedule: str = "constant"  # "constant" | "cosine" (per step, after a linear warm-up)
    warmup_epochs: float = 0.0
    monitor: str = "val_loss"  # which validation number picks best.pt: "val_loss" (lower) | "val_iou" (higher)
    patience: int = 0  # stop after this many epochs without a better monitor value; 0 = never
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    amp: bool = False  # mixed precision: bfloat16 autocast on the CPU, float16 with loss scaling on CUDA
    channels_last: bool = False  # NHWC tensors, the layout oneDNN's CPU convolutions prefer
    sync_bn: bool = False  # SyncBatchNorm across processes in distributed training
    dropout: float = 0.2  # the paper names Dropout in every decoder block but not its rate
    decoder_attention: str = "none"  # "scse": squeeze-and-excitation in each decoder block (arch unet; others ignore it)
    val_fraction: float = 0.1
    seed: int = 0
    split_seed: int | None = None  # draws the validation images; None: `seed`. Fixed, seeds differ in training
    # only and their validation scores compare
    weights: str = "imagenet"  # "imagenet" ($LESIONSEG_WEIGHTS, else torchvision's API), "auto" (the same, else
    # from scratch with a warning), "none", or a state_dict file
    init: str | None = None  # start from this trained model (a checkpoint or run folder) instead of `weights`, e.g.
    # to fine-tune the released model on new data or at a larger size
    freeze_bn: bool = False  # encoder BatchNorm statistics fixed (eval mode) while the encoder fine-tunes
    encoder_lr_scale: float = 1.0  # the encoder's lr is lr * this (a pretrained encoder needs smaller steps)
    unfreeze_after: int = 0  # train the decoder alone for this many epochs before fine-tuning the encoder
    soft_masks: bool = False  # train on each mask's coverage at the input size (fractions at the border) instead
    # of thresholding it there; validation and scores use the binary masks
    hflip: bool = True
    rotation: float = 60.0  # degrees, the paper's +-60
    threshold: float = 0.5
    strict: bool = False  # stop at the first bad image/mask pair instead of skipping and listing it
    num_workers: int = 0  # data is a cached in-memory tensor; workers only add IPC on 2 cores
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.image_size % 32 != 0 or self.image_size < 32:
            raise ConfigError(f"image_size must be a multiple of 32, got {self.image_size}")
        choices = {"arch": ARCHS, "optimizer": ("adam", "adamw"), "schedule": ("constant", "cosine"),
                   "monitor": ("val_loss", "val_iou"), "decoder_attention": ATTENTIONS}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"unknown {key} {getattr(self, key)!r}; choose from: {', '.join(allowed)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("epochs and batch_size must be at least 1")
        if self.encoder_lr_scale <= 0 or not 0 <= self.unfreeze_after < self.epochs:
            raise ConfigError("encoder_lr_scale must be > 0 and unfreeze_after in [0, epochs)")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")

    @property
    def model_name(self) -> str:
        """What the page, the API and an exported file call the model."""
        return f"{self.name} ({self.arch}, {self.image_size} px)"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**values)


def load_preset(name: str) -> dict[str, Any]:
    """The preset's values as a dict (presets are data, in `lesionseg/presets/*.yaml`)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from: {', '.join(PRESETS)}")
    text = resources.files("lesionseg").joinpath("presets", f"{name}.yaml").read_text()
    return yaml.safe_load(text)


def build_config(preset: str | None = None, **overrides: Any) -> TrainConfig:
    """A preset's values updated with every override that is not None."""
    values = load_preset(preset) if preset else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.from_dict(values)


def save_config(config: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def read_config(path: Path) -> TrainConfig:
    return TrainConfig.from_dict(yaml.safe_load(path.read_text()))
