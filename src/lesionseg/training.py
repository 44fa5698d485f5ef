"""The training loop: forward, loss, backward, step, validate, log, checkpoint — in that order."""

from __future__ import annotations

import csv
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lesionseg.config import TrainConfig, save_config
from lesionseg.data import EvalPreset, SegmentationDataset, TrainPreset, load_split, train_val_indices, write_split
from lesionseg.errors import CheckpointError, LesionsegError
from lesionseg.losses import WeightedSum
from lesionseg.metrics import MetricAccumulator
from lesionseg.models import build_model

LOG_FIELDS = ("epoch", "train_loss", "val_loss", "val_iou", "val_dice", "lr", "seconds", "train_images_per_s")


class Interrupted(LesionsegError):
    """Training stopped by Ctrl-C after the last checkpoint was saved."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write to a temp file in the same folder, then rename: a crash or full disk never leaves a half file."""
    tmp = None
    try:
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
            tmp = Path(handle.name)
            torch.save(state, handle)
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise CheckpointError(f"{path}: checkpoint not written ({exc.strerror or exc}); the previous one is intact") from None


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt"
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file fails in many ways inside torch
        raise CheckpointError(f"{path}: not a readable lesionseg checkpoint ({exc.__class__.__name__})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path}: not a lesionseg checkpoint (no model/config inside)")
    return state


def model_from_checkpoint(state: dict[str, Any]) -> tuple[nn.Module, TrainConfig]:
    """Rebuild the model from the config stored in the checkpoint: no architecture flags needed."""
    config = TrainConfig.from_dict(state["config"])
    model = build_model(config.arch, weights="none", freeze_encoder=config.freeze_encoder, dropout=config.dropout)
    model.load_state_dict(state["model"])
    return model.eval(), config


def train_one_epoch(model, loader, loss_fn, optimizer, bar) -> tuple[float, int]:
    """Mean training loss over the epoch and the number of images seen."""
    model.train()
    total, count = 0.0, 0
    for images, masks in loader:
        logits = model(images)
        loss = loss_fn(logits, masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(images)
        count += len(images)
        bar.update(1)
        bar.set_postfix(loss=f"{total / count:.4f}")
    return total / count, count


@torch.no_grad()
def validate(model, loader, loss_fn, threshold: float) -> dict[str, float]:
    """Loss and scores over the whole validation split (no batch averaging of scores)."""
    model.eval()
    metrics = MetricAccumulator(threshold)
    total, count = 0.0, 0
    for images, masks in loader:
        logits = model(images)
        total += loss_fn(logits, masks).item() * len(images)
        count += len(images)
        metrics.update(logits, masks)
    scores = metrics.compute()
    return {"val_loss": total / count, "val_iou": scores["iou_per_image"], "val_dice": scores["dice_per_image"]}


def make_loaders(config: TrainConfig, run_dir: Path) -> tuple[DataLoader, DataLoader]:
    """Seeded train/validation split of the training data (saved as split.json), as loaders."""
    data = load_split(config.data, "train", config.image_size, config.cache_dir)
    train_idx, val_idx = train_val_indices(len(data), config.val_fraction, config.seed)
    write_split(run_dir / "split.json", data.ids, train_idx, val_idx, config.seed)
    train_set = SegmentationDataset(data.subset(train_idx), TrainPreset(config.hflip, config.rotation))
    val_set = SegmentationDataset(data.subset(val_idx), EvalPreset())
    generator = torch.Generator().manual_seed(config.seed)
    # a last batch of one image breaks BatchNorm at the 1x1 bottleneck; validation keeps every image
    drop_last = len(train_set) > config.batch_size
    train = DataLoader(train_set, config.batch_size, shuffle=True, drop_last=drop_last,
                       num_workers=config.num_workers, generator=generator)
    val = DataLoader(val_set, config.batch_size, shuffle=False, num_workers=config.num_workers)
    return train, val


def fit(config: TrainConfig, progress: bool = True) -> Path:
    """Train per `config` into `config.out`: config.yaml, split.json, log.csv, last.pt, best.pt."""
    run_dir = Path(config.out)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    except OSError as exc:
        raise CheckpointError(f"{run_dir}: cannot write the run folder ({exc.strerror or exc})") from None
    seed_everything(config.seed)
    train_loader, val_loader = make_loaders(config, run_dir)
    model = build_model(config.arch, config.weights, config.freeze_encoder, config.dropout)
    loss_fn = WeightedSum(config.loss)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=config.lr, weight_decay=config.weight_decay)

    state = {"config": config.to_dict(), "epoch": 0, "best_metric": float("inf"), "history": []}
    log_path = run_dir / "log.csv"
    with open(log_path, "w", newline="") as handle:
        csv.writer(handle).writerow(LOG_FIELDS)

    def checkpoint(name: str) -> None:
        save_checkpoint({**state, "model": model.state_dict(), "optimizer": optimizer.state_dict()}, run_dir / name)

    bar = tqdm(total=config.epochs * len(train_loader), desc=config.name, unit="batch", disable=not progress)
    try:
        for epoch in range(1, config.epochs + 1):
            start = time.perf_counter()
            train_loss, seen = train_one_epoch(model, train_loader, loss_fn, optimizer, bar)
            seconds = time.perf_counter() - start
            row = {"epoch": epoch, "train_loss": train_loss, **validate(model, val_loader, loss_fn, config.threshold)}
            row.update(lr=optimizer.param_groups[0]["lr"], seconds=seconds,
                       train_images_per_s=seen / seconds)
            with open(log_path, "a", newline="") as handle:
                csv.writer(handle).writerow([row[f] for f in LOG_FIELDS])
            state["history"].append(row)
            state["epoch"] = epoch
            bar.set_description(f"{config.name} epoch {epoch}/{config.epochs} val_loss {row['val_loss']:.4f}")
            if row["val_loss"] < state["best_metric"]:  # best by validation loss: never by the test split
                state["best_metric"] = row["val_loss"]
                checkpoint("best.pt")
            checkpoint("last.pt")
    except KeyboardInterrupt:
        checkpoint("last.pt")
        raise Interrupted(f"interrupted after epoch {state['epoch']}; last checkpoint: {run_dir / 'last.pt'}") from None
    finally:
        bar.close()
    return run_dir


def read_log(run_dir: Path) -> list[dict[str, float]]:
    with open(run_dir / "log.csv", newline="") as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]
