"""The training loop: forward, loss, backward, step, schedule, validate, log, checkpoint — in that order.

The same code runs as one process or as several under torchrun (see `distributed.py`). Data order comes
from a DistributedSampler seeded per epoch and augmentation is seeded per sample, so a resumed run, and
a run split over N processes, see exactly the batches an uninterrupted single process sees.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from lesionseg.errors import CheckpointError, Interrupted, LesionsegError, TrainingError
from lesionseg.files import output_folder, remove_stale_temps, shown
from lesionseg.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from lesionseg.train.config import TrainConfig, read_config, save_config
from lesionseg.train.distributed import Process, barrier, init_process, mean_across, resolve_device
from lesionseg.train.losses import WeightedSum
from lesionseg.train.metrics import MetricAccumulator
from lesionseg.train.models import build_model
from lesionseg.train.precision import autocast, resolve_formats, warn_if_slow_bf16, what_ran
from lesionseg.train.rundir import RunDir
from lesionseg.train.runsetup import load_init, make_loaders, run_info, warn_if_init_trained_on_validation
from lesionseg.train.weights import FROM_SCRATCH, resolve_weights


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Group 0: the decoder at lr; group 1: the encoder at lr * encoder_lr_scale, unless it stays frozen.
    A frozen encoder's parameters have no gradient, so the optimizer leaves them alone until they thaw."""
    groups = [{"params": list(model.decoder.parameters()), "lr": config.lr}]
    if not config.freeze_encoder:
        groups.append({"params": list(model.encoder.parameters()), "lr": config.lr * config.encoder_lr_scale})
    kind = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return kind(groups, lr=config.lr, weight_decay=config.weight_decay)


def build_scheduler(config: TrainConfig, optimizer, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step factor on lr: linear warm-up, then constant or cosine decay to zero at the last step."""
    warmup = round(config.warmup_epochs * steps_per_epoch)
    total = config.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_one_epoch(
    model, loader, loss_fn, optimizer, scheduler, scaler, device, bar, amp: bool = False, channels_last: bool = False
) -> tuple[float, int]:
    """Mean training loss over this process's batches and the number of images it saw."""
    model.train()
    total, count = 0.0, 0
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for images, masks in loader:
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        masks = masks.to(device, non_blocking=True)
        with autocast(device, amp):
            loss = loss_fn(model(images), masks)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        total += loss.item() * len(images)
        count += len(images)
        bar.update(1)
        bar.set_postfix(loss=f"{total / count:.4f}")
    return total / count, count


@torch.no_grad()
def validate(
    model, loader, loss_fn, threshold: float, device, amp: bool = False, channels_last: bool = False
) -> dict[str, float]:
    """Loss and scores over the whole validation split (scores from summed counts, not batch means), in the
    training's own numeric format."""
    model.eval()
    metrics = MetricAccumulator(threshold)
    total, count = 0.0, 0
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for images, masks in loader:
        images, masks = images.to(device, memory_format=memory_format), masks.to(device)
        with autocast(device, amp):
            logits = model(images).float()
        total += loss_fn(logits, masks).item() * len(images)
        count += len(images)
        metrics.update(logits.float().cpu(), masks.cpu())
    scores = metrics.compute()
    return {"val_loss": total / count, "val_iou": scores["iou_per_image"], "val_dice": scores["dice_per_image"]}


def is_better(value: float, best: float | None, monitor: str) -> bool:
    return best is None or (value > best if monitor == "val_iou" else value < best)


class Trainer:
    """Holds what one run trains and saves; `fit` is the loop."""

    def __init__(self, config: TrainConfig, run_dir: Path, process: Process) -> None:
        self.config, self.run_dir, self.process = config, run_dir, process
        self.run = RunDir(run_dir)
        self.device = resolve_device(config.device, process)
        seed_everything(config.seed + process.rank)
        self.train_loader, self.val_loader, data = make_loaders(config, run_dir, process)
        self.info = run_info(config, data, process)
        start, weights = None, FROM_SCRATCH
        if config.init:
            start, self.info["init"] = load_init(config)
            if process.is_main:
                warn_if_init_trained_on_validation(Path(self.info["init"]["checkpoint"]), run_dir)
        else:
            weights = resolve_weights(config.weights)
        self.info["weights"] = self.info["init"]["weights"] if start is not None else weights.describe()
        model = build_model(
            config.arch,
            weights,
            self.encoder_frozen(1),
            config.dropout,
            config.decoder_attention,
            config.freeze_bn,
            config.colour_constancy,
        )
        if start is not None:
            model.load_state_dict(start)
        if config.sync_bn and process.world > 1:
            if self.device.type == "cpu":
                raise LesionsegError("--sync-bn needs GPUs: PyTorch's SyncBatchNorm does not run on the CPU")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.amp, self.channels_last = resolve_formats(config, self.device)
        self.info["formats"] = what_ran(self.device, self.amp, self.channels_last)
        self.model = model.to(
            self.device, memory_format=torch.channels_last if self.channels_last else torch.contiguous_format
        )
        self.net = self.wrap()
        self.loss_fn = WeightedSum(config.loss)
        self.optimizer = build_optimizer(config, self.model)
        self.scheduler = build_scheduler(config, self.optimizer, len(self.train_loader))
        if process.is_main:
            ran = self.info["formats"]
            print(
                f"lesionseg: training on {self.info['cpu']['model'] if self.device.type == 'cpu' else ran['device']}"
                f" ({ran['cpu_capability']}): {ran['precision']}, {ran['memory_format']}, {ran['allocator']}",
                file=sys.stderr,
            )
            warn_if_slow_bf16(self.device, self.amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp and self.device.type == "cuda")
        self.state: dict[str, Any] = {"epoch": 0, "best_metric": None, "best_epoch": 0, "history": []}

    def encoder_frozen(self, epoch: int) -> bool:
        return self.config.freeze_encoder or epoch <= self.config.unfreeze_after

    def wrap(self) -> nn.Module:
        """DDP over the model's trainable parameters as they are now (our encoders keep MobileNetV2's
        classifier, which the paper counts but never runs, hence find_unused_parameters)."""
        if self.process.world == 1:
            return self.model
        return DistributedDataParallel(self.model, find_unused_parameters=self.config.arch != "smp-unet")

    def thaw_encoder_if_due(self, epoch: int) -> None:
        """End the decoder-only warm-up: the encoder trains from this epoch on (DDP rebuilt to include it)."""
        if self.model.freeze_encoder and not self.encoder_frozen(epoch):
            self.model.set_encoder_frozen(False)
            self.net = self.wrap()

    def checkpoint(self, path: Path) -> None:
        if not self.process.is_main:
            return
        save_checkpoint(
            {
                **self.state,
                "config": self.config.to_dict(),
                "info": self.info,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": rng_state(),
            },
            path,
        )

    def restore(self, saved: dict[str, Any]) -> None:
        """Continue exactly where an epoch-boundary checkpoint left off; one that lacks a part of that (or holds
        another model's) is one line naming it."""
        try:
            self.model.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
            self.scaler.load_state_dict(saved["scaler"])
            set_rng_state(saved["rng"])
            state = {k: saved[k] for k in ("epoch", "best_metric", "best_epoch", "history")}
            if not (isinstance(state["epoch"], int) and isinstance(state["history"], list)):
                raise TypeError("epoch or history of the wrong type")
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
            first = (str(exc).splitlines() or [exc.__class__.__name__])[0][:200]
            raise CheckpointError(
                f"{shown(self.run.last)}: cannot be resumed ({exc.__class__.__name__}: {first})"
            ) from None
        self.state = state

    def write_log(self) -> None:
        """log.csv from the history itself, so a resumed run never repeats or skips a row."""
        if self.process.is_main:
            self.run.write_log(self.state["history"])

    def fit(self, progress: bool) -> None:
        config, state = self.config, self.state
        self.write_log()
        remaining = (config.epochs - state["epoch"]) * len(self.train_loader)
        bar = tqdm(total=remaining, desc=config.name, unit="batch", disable=not (progress and self.process.is_main))
        try:
            for epoch in range(state["epoch"] + 1, config.epochs + 1):
                if self.stop_early():
                    break
                self.thaw_encoder_if_due(epoch)
                self.train_loader.sampler.set_epoch(epoch)
                self.train_loader.dataset.epoch = epoch
                start = time.perf_counter()
                loss, seen = train_one_epoch(
                    self.net,
                    self.train_loader,
                    self.loss_fn,
                    self.optimizer,
                    self.scheduler,
                    self.scaler,
                    self.device,
                    bar,
                    self.amp,
                    self.channels_last,
                )
                seconds = time.perf_counter() - start
                row = {
                    "epoch": epoch,
                    "train_loss": mean_across(loss, seen, self.process, self.device),
                    **validate(
                        self.model,
                        self.val_loader,
                        self.loss_fn,
                        config.threshold,
                        self.device,
                        self.amp,
                        self.channels_last,
                    ),
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "seconds": seconds,
                    "train_images_per_s": seen * self.process.world / seconds,
                }
                self.refuse_divergence(row, epoch)
                state["history"].append(row)
                state["epoch"] = epoch
                bar.set_description(
                    f"{config.name} epoch {epoch}/{config.epochs} {config.monitor} {row[config.monitor]:.4f}"
                )
                if is_better(row[config.monitor], state["best_metric"], config.monitor):  # never by the test split
                    state["best_metric"], state["best_epoch"] = row[config.monitor], epoch
                    self.checkpoint(self.run.best)
                self.checkpoint(self.run.last)
                self.write_log()
                barrier(self.process)
        except KeyboardInterrupt:
            # last.pt already holds the last finished epoch (exactly resumable); before the first, save what there is
            if not self.run.last.is_file():
                state["partial"] = True
                self.checkpoint(self.run.last)
            raise Interrupted(f"interrupted after epoch {state['epoch']}; last checkpoint: {self.run.last}") from None
        finally:
            bar.close()

    def refuse_divergence(self, row: dict[str, float], epoch: int) -> None:
        """A loss that is no longer a number (too high an lr, an overflow) ends the run before its model can be
        saved: best.pt and last.pt keep the last finite epoch."""
        losses = {key: row[key] for key in ("train_loss", "val_loss")}
        if all(math.isfinite(value) for value in losses.values()):
            return
        kept = f"best.pt holds epoch {self.state['best_epoch']}" if self.state["best_epoch"] else "no model was saved"
        raise TrainingError(
            f"{shown(self.run_dir)}: training diverged in epoch {epoch} "
            f"(train loss {losses['train_loss']}, validation loss {losses['val_loss']}); {kept}; try a lower --lr"
        )

    def stop_early(self) -> bool:
        patience = self.config.patience
        return bool(patience) and self.state["epoch"] - self.state["best_epoch"] >= patience


def claim_run_folder(run: RunDir, resume: bool, overwrite: bool) -> None:
    """The run folder, created; an earlier run in it is never replaced unless asked (`--overwrite`), and a
    killed checkpoint write's temp files are removed."""
    if run.holds_run() and not (resume or overwrite):
        raise CheckpointError(
            f"{shown(run.path)}: holds a training run already; continue it with --resume {shown(run.path)}, "
            "replace it with --overwrite, or choose another --out"
        )
    folder = output_folder(run.path, "run folder")
    for name in (run.last.name, run.best.name):
        remove_stale_temps(folder, name)


def forget_replaced_run(run: RunDir) -> None:
    """--overwrite: the earlier run's checkpoints, log and scores go, once the new run has set up without error,
    so that nothing of it can be mistaken for the new run's."""
    for path in (run.last, run.best, run.log):
        path.unlink(missing_ok=True)
    shutil.rmtree(run.eval, ignore_errors=True)


def fit(config: TrainConfig, progress: bool = True, resume: bool = False, overwrite: bool = False) -> Path:
    """Train per `config` into `config.out`: config.yaml, run.json, split.json, log.csv, last.pt, best.pt.
    The data, the weights and the model are all set up before config.yaml is written."""
    process = init_process(config.device)
    run_dir = Path(config.out)
    run = RunDir(run_dir)
    if process.is_main:
        claim_run_folder(run, resume, overwrite)
    barrier(process)
    saved = load_checkpoint(run.last) if resume and run.last.is_file() else None  # refused before any work if unsafe
    trainer = Trainer(config, run_dir, process)
    if saved is not None and not saved.get("partial"):  # one from inside the first epoch cannot be continued exactly
        trainer.restore(saved)
    if process.is_main:
        if overwrite and not resume:
            forget_replaced_run(run)
        try:
            save_config(config, run.config)
            run.info.write_text(json.dumps(trainer.info, indent=1))
        except OSError as exc:
            raise CheckpointError(f"{run_dir}: cannot write the run folder ({exc.strerror or exc})") from None
    trainer.fit(progress)
    return run_dir


def resume_config(run_dir: str | os.PathLike) -> TrainConfig:
    path = RunDir(Path(run_dir)).config
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; --resume takes a run folder written by `lesionseg train`")
    config = read_config(path)
    config.out = str(run_dir)  # the folder as it is now, even if it was moved since
    return config
