"""A training run's folder: the one place that knows its file names and how to read them.

RUN/config.yaml  the resolved TrainConfig        RUN/split.json  the seeded train/validation ids
RUN/run.json     versions, data, weights, CPU    RUN/log.csv     one row per epoch
RUN/last.pt      the latest epoch (resumable)    RUN/best.pt     the best epoch by validation
RUN/eval/        metrics.json and per_image.csv of the test split
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOG_FIELDS = ("epoch", "train_loss", "val_loss", "val_iou", "val_dice", "lr", "seconds", "train_images_per_s")


@dataclass(frozen=True)
class RunDir:
    path: Path

    @classmethod
    def of(cls, source: str | os.PathLike) -> RunDir:
        """The run a folder is, or a checkpoint file lies in."""
        source = Path(source)
        return cls(source if source.is_dir() else source.parent)

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def info(self) -> Path:
        return self.path / "run.json"

    @property
    def split(self) -> Path:
        return self.path / "split.json"

    @property
    def log(self) -> Path:
        return self.path / "log.csv"

    @property
    def last(self) -> Path:
        return self.path / "last.pt"

    @property
    def best(self) -> Path:
        return self.path / "best.pt"

    @property
    def eval(self) -> Path:
        return self.path / "eval"

    def holds_run(self) -> bool:
        """Whether a run was trained here (its config, checkpoints or log), not just a folder of that name."""
        return any(path.exists() for path in (self.config, self.last, self.best, self.log))

    def read_split(self) -> dict[str, Any]:
        return json.loads(self.split.read_text())

    def read_info(self) -> dict[str, Any]:
        return json.loads(self.info.read_text()) if self.info.is_file() else {}

    def read_log(self) -> list[dict[str, float]]:
        with open(self.log, newline="") as handle:
            return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]

    def write_log(self, history: list[dict[str, float]]) -> None:
        with open(self.log, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(LOG_FIELDS)
            writer.writerows([row[f] for f in LOG_FIELDS] for row in history)

    def best_validation(self, monitor: str = "val_iou") -> dict[str, float]:
        """How many epochs ran, the one best.pt holds by `monitor` (higher IoU, lower loss) and its value."""
        rows = self.read_log()
        best = (max if monitor == "val_iou" else min)(rows, key=lambda row: row[monitor])
        return {"epochs_run": len(rows), "best_epoch": int(best["epoch"]), monitor: best[monitor]}

    def epoch_seconds(self) -> float:
        """Training time of all epochs, from log.csv (validation and checkpoints not included)."""
        return sum(row["seconds"] for row in self.read_log())


def checkpoint_path(source: str | os.PathLike) -> Path:
    """A checkpoint file as given, or a run folder's best.pt."""
    source = Path(source)
    return RunDir(source).best if source.is_dir() else source
