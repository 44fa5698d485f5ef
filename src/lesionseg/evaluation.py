"""Score a trained checkpoint on a split: per-image and pooled metrics, per-image CSV."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lesionseg.data import CachedSplit, load_split, normalize
from lesionseg.metrics import MetricAccumulator
from lesionseg.training import load_checkpoint, model_from_checkpoint


@torch.no_grad()
def predict_logits(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 32, progress: bool = False) -> torch.Tensor:
    """uint8 (N,3,S,S) -> logits (N,1,S,S), in batches."""
    model.eval()
    chunks = range(0, len(images), batch_size)
    return torch.cat([model(normalize(images[i : i + batch_size])) for i in tqdm(chunks, disable=not progress, desc="predict")])


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    data: str | os.PathLike | None = None,
    split: str = "test",
    out: str | os.PathLike | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    """Metrics of `checkpoint` on `split` at the model's resolution; written to `out` if given."""
    state = load_checkpoint(checkpoint)
    model, config = model_from_checkpoint(state)
    cached = load_split(data if data is not None else config.data, split, config.image_size, config.cache_dir)
    logits = predict_logits(model, cached.images, batch_size, progress)
    result = score_predictions(logits, cached, config.threshold)
    result.update(
        checkpoint=str(checkpoint), split=split, images=len(cached), image_size=config.image_size,
        epoch=state["epoch"], train_loss=state["history"][-1]["train_loss"] if state["history"] else None,
        val_loss=state["history"][-1]["val_loss"] if state["history"] else None, best_val_loss=state["best_metric"],
    )
    if out is not None:
        write_evaluation(result, Path(out))
    return result


def score_predictions(logits: torch.Tensor, cached: CachedSplit, threshold: float) -> dict[str, Any]:
    metrics = MetricAccumulator(threshold)
    metrics.update(logits, cached.masks)
    per_image = metrics.per_image()
    return {
        "metrics": metrics.compute(),
        "per_image": [{"id": i, **{k: v[n] for k, v in per_image.items()}} for n, i in enumerate(cached.ids)],
    }


def write_evaluation(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    summary = {k: v for k, v in result.items() if k != "per_image"}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    rows = result["per_image"]
    with open(out / "per_image.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
