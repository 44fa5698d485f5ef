"""One configuration object for a training run, built from a preset plus command-line overrides.

Each option is declared once, as a field of `TrainConfig` with its help (and choices) in the field's metadata;
`add_config_flags` turns the fields into the command line's flags. No PyTorch here: the command line reads
this module to build its parser, and a one-line error must not cost a PyTorch import.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from lesionseg.errors import LesionsegError
from lesionseg.segment.predictors import IMAGE_SIZES, MAX_NAME

PAPER_PRESETS = ("model1-frozen", "model2-finetune")
PRESETS = (*PAPER_PRESETS, "unet-finetune")
# The decoder registry: arch name -> decoder class in lesionseg.train.models. A new decoder is one class there and one
# line here; `build_model` and the --arch choices both read this table.
DECODERS = {"seed": "SeedDecoder", "unet": "UNetDecoder", "smp-unet": "SmpUnetDecoder"}
ATTENTIONS = ("none", "scse")
LOSS_NAMES = ("bce", "dice", "focal", "lovasz", "tversky")  # lesionseg.train.losses.LOSSES builds each


class ConfigError(LesionsegError):
    """A preset or override that cannot make a valid configuration."""


def parse_loss(text: str) -> dict[str, float]:
    """'bce+0.1*dice' -> {'bce': 1.0, 'dice': 0.1}."""
    weights = {}
    for term in str(text).replace(" ", "").split("+"):
        weight, _, name = term.rpartition("*")
        try:
            weights[name] = float(weight) if weight else 1.0
        except ValueError:
            raise ConfigError(f"bad loss term {term!r}; write e.g. 'bce+0.1*dice'") from None
    check_loss(weights)
    return weights


def check_loss(weights: dict[str, float]) -> None:
    unknown = sorted(set(weights) - set(LOSS_NAMES))
    if unknown or not weights:
        raise ConfigError(f"unknown loss {', '.join(unknown) or '(none)'}; choose from: {', '.join(LOSS_NAMES)}")
    if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights.values()):
        raise ConfigError(f"loss weights must be finite numbers, got {weights}")


def option(default: Any, help: str, choices: tuple | None = None, shortcuts: dict | None = None, **kwargs) -> Any:
    """A config field with what its command-line flag needs. `shortcuts`: {flag: (value, help)}, flags that
    set this field to a fixed value (e.g. --no-pretrained for weights none)."""
    meta = {"help": help, "choices": choices, "shortcuts": shortcuts or {}}
    if callable(default):
        return field(default_factory=default, metadata=meta, **kwargs)
    return field(default=default, metadata=meta, **kwargs)


@dataclass
class TrainConfig:
    """Everything that decides what a training run does; saved as `config.yaml` beside the run."""

    name: str = option("run", "the run's name, shown by the page, the API and an exported file")
    arch: str = option(
        "seed", "seed: the paper's decoder; unet: ours with skips; smp-unet: smp's Unet", tuple(DECODERS)
    )
    freeze_encoder: bool = option(False, "the encoder does not learn (the paper's Model 1)")
    loss: dict[str, float] = option(lambda: {"bce": 1.0}, f"e.g. 'bce', 'bce+0.1*dice'; terms: {', '.join(LOSS_NAMES)}")
    data: str | None = option(
        None, "dataset folder (ISIC 2016 layout or images/ + masks/); default: the embedded sample"
    )
    extra_data: list[str] = option(
        list, "another folder of pairs added to training only (never validation); repeatable"
    )
    out: str = option("runs/run", "run folder (train's default: runs/<preset>)")
    image_size: int = option(128, "input size in pixels, a multiple of 32 from 32 to 1024")
    epochs: int = option(40, "epochs to train")
    batch_size: int = option(16, "images per step (the global batch under torchrun)")
    lr: float = option(1e-3, "learning rate")
    weight_decay: float = option(0.0, "weight decay")
    optimizer: str = option("adam", "the optimizer", ("adam", "adamw"))
    schedule: str = option("constant", "per-step lr schedule after the warm-up", ("constant", "cosine"))
    warmup_epochs: float = option(0.0, "linear lr warm-up, in epochs")
    monitor: str = option("val_loss", "what picks best.pt and stops early", ("val_loss", "val_iou"))
    patience: int = option(0, "stop after N epochs without a better monitor value (0: never)")
    device: str = option("auto", "auto (cuda if available), cpu, cuda, cuda:N")
    amp: bool | None = option(
        None,
        "mixed precision: bfloat16 autocast on the CPU, float16 with loss scaling on CUDA; default: on for CPUs with "
        "AVX512-BF16 or AMX (fast there, and measured to hold accuracy), off elsewhere",
    )
    channels_last: bool | None = option(
        None, "NHWC tensors, the layout oneDNN's CPU convolutions prefer; default: on for the CPU, off on CUDA"
    )
    sync_bn: bool = option(False, "SyncBatchNorm across GPUs under torchrun")
    dropout: float = option(0.2, "dropout rate in the decoder (the paper names Dropout but not its rate)")
    decoder_attention: str = option(
        "none", "scse: squeeze-and-excitation in each decoder block (arch unet)", ATTENTIONS
    )
    val_fraction: float = option(0.1, "share of the training split held out for validation")
    seed: int = option(0, "seeds initialisation, augmentation, batch order (and the split, unless --split-seed)")
    split_seed: int | None = option(
        None, "draws the validation images (default: --seed); fix it to compare seeds on the same validation images"
    )
    weights: str = option(
        "imagenet",
        "encoder weights: a mobilenet_v2 state_dict FILE, 'imagenet' ($LESIONSEG_WEIGHTS, "
        "else torchvision's cache or download), 'auto' (the same, else from scratch), 'none'",
        shortcuts={"--no-pretrained": ("none", "encoder from scratch (--weights none)")},
    )
    init: str | None = option(
        None,
        "start from a trained model (.pt or run folder) of the same --arch instead of "
        "ImageNet weights: fine-tune it on new data, at another size, with another loss",
    )
    freeze_bn: bool = option(False, "keep the encoder's BatchNorm statistics fixed while it fine-tunes")
    encoder_lr_scale: float = option(1.0, "the encoder's learning rate is --lr times this")
    unfreeze_after: int = option(0, "train the decoder alone for N epochs first")
    soft_masks: bool = option(
        False,
        "train on each mask's coverage at --image-size instead of thresholding it there; "
        "validation and scores use the binary masks",
    )
    hflip: bool = option(True, "random horizontal flips in training")
    rotation: float = option(60.0, "random rotation in training, +- this many degrees (the paper's 60)")
    colour_constancy: bool = option(
        False, "Shades of Gray colour constancy (p = 6) on every input, inside the model and its ONNX export"
    )
    scale: float = option(0.0, "random zoom in training, by a factor in [1 - s, 1 + s] (0: none)")
    colour: float = option(
        0.0, "random brightness, contrast and saturation by up to this share, hue by a quarter of it (0: none)"
    )
    threshold: float = option(0.5, "probability at and above which a pixel is lesion")
    strict: bool = option(False, "stop at the first bad image/mask pair (default: skip and list it)")
    num_workers: int = option(0, "DataLoader workers (data is an in-memory tensor: workers only add IPC on 2 cores)")
    cache_dir: str | None = option(
        None, "where resized images are cached (default $LESIONSEG_CACHE or ~/.cache/lesionseg)"
    )

    def __post_init__(self) -> None:
        if isinstance(self.loss, str):  # as the command line gives it: 'bce+0.1*dice'
            self.loss = parse_loss(self.loss)
        self.check_types()
        if self.image_size not in IMAGE_SIZES:
            raise ConfigError(f"image_size must be a multiple of 32 from 32 to 1024, got {self.image_size}")
        for f in dataclasses.fields(self):
            allowed = f.metadata.get("choices")
            if allowed and getattr(self, f.name) not in allowed:
                raise ConfigError(f"unknown {f.name} {getattr(self, f.name)!r}; choose from: {', '.join(allowed)}")
        check_loss(self.loss)
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("epochs and batch_size must be at least 1")
        if not (math.isfinite(self.lr) and self.lr >= 0) or not (
            math.isfinite(self.weight_decay) and self.weight_decay >= 0
        ):
            raise ConfigError(
                f"lr must be a finite number >= 0 and weight_decay >= 0, got {self.lr} and {self.weight_decay}"
            )
        if not 0 <= self.dropout < 1 or not 0 < self.threshold < 1 or self.patience < 0 or self.warmup_epochs < 0:
            raise ConfigError("dropout must be in [0, 1), threshold in (0, 1), patience and warmup_epochs >= 0")
        if (
            not (math.isfinite(self.encoder_lr_scale) and self.encoder_lr_scale > 0)
            or not 0 <= self.unfreeze_after < self.epochs
        ):
            raise ConfigError("encoder_lr_scale must be > 0 and unfreeze_after in [0, epochs)")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ConfigError(f"unknown device {self.device!r}; choose auto, cpu, cuda, cuda:N or mps")
        if len(self.name) > MAX_NAME:
            raise ConfigError(f"name is {len(self.name):,} characters; at most {MAX_NAME}")
        if self.seed < 0 or (self.split_seed is not None and self.split_seed < 0):
            raise ConfigError(f"seed and split_seed must be >= 0, got {self.seed} and {self.split_seed}")
        if self.num_workers < 0 or not math.isfinite(self.rotation):
            raise ConfigError("num_workers must be >= 0 and rotation a finite number")
        if not 0 <= self.scale < 1 or not 0 <= self.colour <= 1:
            raise ConfigError(f"scale must be in [0, 1) and colour in [0, 1], got {self.scale} and {self.colour}")

    def check_types(self) -> None:
        """Values from a YAML file or a checkpoint are not checked by the dataclass itself: a string where a number
        belongs would fail deep inside training instead of here."""
        hints = typing.get_type_hints(TrainConfig)
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), plain_type(hints[f.name])
            if value is None and optional(hints[f.name]):
                continue
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, f.name, float(value))
            elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ConfigError(f"{f.name} must be {kind.__name__}, got {value!r}")

    @property
    def model_name(self) -> str:
        """What the page, the API and an exported file call the model."""
        return f"{self.name} ({self.arch}, {self.image_size} px)"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        if not isinstance(values, dict):
            raise ConfigError(f"a config must be a mapping of keys to values, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known, key=str)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(map(str, unknown))}")
        return cls(**values)


@dataclass(frozen=True)
class AdaptRecipe:
    """`lesionseg adapt`'s fine-tune: gentle by construction (`adapt/finetune.py` says why; docs/adapt.md has the
    measurements that chose it). A fixed number of steps, whatever the number of masks."""

    steps: int = 60
    lr: float = 1e-5
    encoder_lr_scale: float = 1.0
    weight_decay: float = 1e-4
    batch_size: int = 8
    folds: int = 5
    seed: int = 0
    loss: str = "bce+dice"

    def __post_init__(self) -> None:
        if not (1 <= self.steps <= MAX_ADAPT_STEPS) or self.batch_size < 1 or self.folds < 2 or self.seed < 0:
            raise ConfigError(
                f"adapt needs 1 <= steps <= {MAX_ADAPT_STEPS}, batch_size >= 1, folds >= 2 and a seed >= 0"
            )
        if not (math.isfinite(self.lr) and 0 < self.lr <= 1):
            raise ConfigError(f"adapt's lr must be a finite number in (0, 1], got {self.lr}")
        if not (math.isfinite(self.encoder_lr_scale) and 0 <= self.encoder_lr_scale <= 1):
            raise ConfigError(f"adapt's encoder_lr_scale must be in [0, 1], got {self.encoder_lr_scale}")


MAX_ADAPT_STEPS = 10_000  # a few hours on two cores; more is a training run (`lesionseg train --init`)


def optional(hint: Any) -> bool:
    return type(None) in typing.get_args(hint)


def plain_type(hint: Any) -> type:
    """int for `int | None`, list for `list[str]`, dict for `dict[str, float]`."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if optional(hint):
        return plain_type(args[0])
    return typing.get_origin(hint) or hint


def add_config_flags(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """One flag per TrainConfig field (`--image-size` for image_size), default None: a flag not given keeps the
    preset's value. Booleans get --x and --no-x."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in exclude:
            continue
        flag, kind, meta = "--" + f.name.replace("_", "-"), plain_type(hints[f.name]), f.metadata
        shortcuts = meta["shortcuts"]
        target = parser.add_mutually_exclusive_group() if shortcuts else parser
        if kind is bool:
            target.add_argument(flag, action=argparse.BooleanOptionalAction, help=meta["help"])
        elif kind is list:
            target.add_argument(flag, action="append", metavar="DIR", help=meta["help"])
        else:  # a dict (the loss) arrives as its text and is parsed by the config itself
            target.add_argument(flag, type=str if kind is dict else kind, choices=meta["choices"], help=meta["help"])
        for extra, (value, text) in shortcuts.items():
            target.add_argument(extra, dest=f.name, action="store_const", const=value, help=text)


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields the command line set (None: not given)."""
    return {f.name: getattr(args, f.name, None) for f in dataclasses.fields(TrainConfig)}


def load_preset(name: str) -> dict[str, Any]:
    """The preset's values as a dict (presets are data, in `lesionseg/presets/*.yaml`)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from: {', '.join(PRESETS)}")
    return safe_yaml(resources.files("lesionseg.train").joinpath("presets", f"{name}.yaml").read_text(), name)


def build_config(preset: str | None = None, **overrides: Any) -> TrainConfig:
    """A preset's values updated with every override that is not None."""
    values = load_preset(preset) if preset else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.from_dict(values)


def save_config(config: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


class NoAliasLoader(yaml.SafeLoader):
    """YAML without anchors and aliases: a config never needs them, and nested aliases ("billion laughs") turn
    one kilobyte into gigabytes."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError("aliases are not allowed in a lesionseg config")
        return super().compose_node(parent, index)


def safe_yaml(text: str, name: str) -> Any:
    try:
        return yaml.load(text, Loader=NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{name}: not a readable config ({str(exc).splitlines()[0]})") from None


def read_config(path: Path) -> TrainConfig:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc.__class__.__name__})") from None
    values = safe_yaml(text, str(path))
    try:
        return TrainConfig.from_dict(values)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
