"""What a run starts from: its seeded data split as loaders, the trained model `--init` names, and what run.json
records to tell two runs apart. The loop itself is `training.py`."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from lesionseg.errors import LesionsegError
from lesionseg.files import sha256_of
from lesionseg.machine import cpu_info
from lesionseg.train.augmentation import EvalPreset, SegmentationDataset, TrainPreset
from lesionseg.train.checkpoint import load_checkpoint, stored_config
from lesionseg.train.config import ConfigError, TrainConfig
from lesionseg.train.data import (
    CachedSplit,
    join_splits,
    load_split,
    train_val_indices,
    write_split,
)
from lesionseg.train.distributed import Process
from lesionseg.train.rundir import RunDir, checkpoint_path
from lesionseg.version import __version__


def load_init(config: TrainConfig) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The trained model a run starts from (`--init`): its weights, and what run.json records of them (the file,
    its sha256 and the weights it started from in turn). Refused in one line if its architecture differs."""
    path = checkpoint_path(config.init)
    state = load_checkpoint(path)
    source = stored_config(state, path)
    differ = [
        f"{key} {getattr(source, key)!r}"
        for key in ("arch", "decoder_attention")
        if getattr(source, key) != getattr(config, key)
    ]
    if differ:
        raise ConfigError(
            f"{path}: cannot start from this model: its {', '.join(differ)} differ from this run's "
            f"(arch {config.arch!r}, decoder_attention {config.decoder_attention!r})"
        )
    about = {
        "checkpoint": str(path.resolve()),
        "sha256": sha256_of(path),
        "weights": state["info"].get("weights") if isinstance(state.get("info"), dict) else None,
    }
    return state["model"], about


def warn_if_init_trained_on_validation(init: Path, run_dir: Path) -> None:
    """Validation images the --init model trained on make this run's validation scores optimistic: say so."""
    source_split = RunDir.of(init).split
    if not source_split.is_file():
        return  # a bare checkpoint: nothing says what it trained on
    source = json.loads(source_split.read_text())
    seen = set(source["train"]) | set(source.get("extra_train", []))
    overlap = seen & set(RunDir(run_dir).read_split()["val"])
    if overlap:
        print(
            f"lesionseg: WARNING: {len(overlap)} of this run's validation images trained the --init model "
            f"({source_split}); validation scores will be optimistic. Hold out the same images (--split-seed "
            f"{source['seed']}) to choose by them",
            file=sys.stderr,
        )


def make_loaders(config: TrainConfig, run_dir: Path, process: Process) -> tuple[DataLoader, DataLoader, CachedSplit]:
    """Seeded train/validation split of the checked training data (split.json), extra folders added to training
    only, as loaders; and all the data, for run.json."""
    load = {
        "size": config.image_size,
        "cache_dir": config.cache_dir,
        "strict": config.strict,
        "quiet": not process.is_main,
    }
    data = load_split(config.data, "train", **load)
    split_seed = config.seed if config.split_seed is None else config.split_seed
    train_idx, val_idx = train_val_indices(len(data), config.val_fraction, split_seed)
    extras = [
        load_split(folder, "train", **load, soft=config.soft_masks) for folder in config.extra_data
    ]  # training only
    everything = join_splits(data, extras, config.extra_data)  # refuses an extra image that is already in data
    if process.is_main:
        write_split(RunDir(run_dir).split, data.ids, train_idx, val_idx, split_seed, everything.ids[len(data) :])
    # --soft-masks: the same pairs with their masks as coverage, for training targets; validation keeps `data`
    targets = load_split(config.data, "train", **load | {"soft": True, "quiet": True}) if config.soft_masks else data
    train_data = join_splits(targets.subset(train_idx), extras, config.extra_data)
    train_set = SegmentationDataset(
        train_data, TrainPreset(config.hflip, config.rotation, config.scale, config.colour), seed=config.seed
    )
    val_set = SegmentationDataset(data.subset(val_idx), EvalPreset())
    if config.batch_size % process.world:
        raise LesionsegError(f"batch size {config.batch_size} does not split evenly over {process.world} processes")
    # a last batch of one image breaks BatchNorm at the 1x1 bottleneck; validation keeps every image
    drop_last = len(train_set) > config.batch_size
    sampler = DistributedSampler(
        train_set, process.world, process.rank, shuffle=True, seed=config.seed, drop_last=False
    )
    train = DataLoader(
        train_set,
        config.batch_size // process.world,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=config.num_workers,
    )
    val = DataLoader(val_set, config.batch_size, shuffle=False, num_workers=config.num_workers)
    return train, val, everything


def run_info(config: TrainConfig, data: CachedSplit, process: Process) -> dict[str, Any]:
    """What is needed to tell two runs apart: versions, data fingerprint and checks, code commit, processes."""
    import segmentation_models_pytorch
    import torchvision

    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                cwd=Path(__file__).parent,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            or None
        )
    except OSError:
        commit = None
    return {
        "lesionseg": __version__,
        "git_commit": commit,
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "segmentation_models_pytorch": segmentation_models_pytorch.__version__,
        "platform": platform.platform(),
        "cpu": cpu_info(),
        "processes": process.world,
        "data_fingerprint": data.fingerprint,
        "data_skipped": data.skipped,
        "data_notes": data.notes,
        "config": config.to_dict(),
    }
