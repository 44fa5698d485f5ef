"""Score a model on a split, at the model's resolution and at each image's own, through the one pipeline
(`lesionseg.segment.pipeline`): the masks scored here are the masks `predict` writes for the same model and options.

Inference refinements are options, each measured on its own: flip test-time augmentation, rotation test-time
augmentation, keeping the largest connected component, filling holes. They may be chosen on the run's own
validation images (`split="val"`), never on the test split.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lesionseg.errors import LesionsegError
from lesionseg.files import claim_output_folder, write_atomically
from lesionseg.images import inspect_mask
from lesionseg.segment.pipeline import Pipeline, Refinements
from lesionseg.segment.predictors import OnnxPredictor
from lesionseg.segment.quality import features
from lesionseg.train.checkpoint import load_checkpoint, stored_config
from lesionseg.train.data import CachedSplit, find_pairs, load_split
from lesionseg.train.metrics import MetricAccumulator
from lesionseg.train.predictor import TorchPredictor
from lesionseg.train.qualitymetrics import quality_accuracy
from lesionseg.train.rundir import RunDir, checkpoint_path

__all__ = ["Refinements", "evaluate_checkpoint", "pipeline_for", "read_per_image", "score_probabilities"]


@dataclass(frozen=True)
class Scoring:
    """What scoring needs besides the model: where the data is, and the model's size and threshold."""

    data: str | None
    image_size: int
    threshold: float
    cache_dir: str | None = None


def pipeline_for(
    source: str | os.PathLike, data, refine: Refinements = Refinements()
) -> tuple[Pipeline, Scoring, dict]:
    """The model to score as a pipeline, the settings scoring needs, and what the checkpoint says of its training.
    An ONNX file knows its size and threshold but not its data: --data is then required."""
    if Path(source).suffix.lower() == ".onnx":
        if data is None:
            raise LesionsegError(f"{source}: an ONNX model does not record its data folder; pass --data")
        predictor = OnnxPredictor(source)
        about = dict.fromkeys(("epoch", "monitor", "best_metric", "train_loss", "val_loss"))
        return Pipeline(predictor, refine), Scoring(str(data), predictor.image_size, predictor.threshold), about
    state = load_checkpoint(source)
    config = stored_config(state, checkpoint_path(source))
    history = state.get("history") if isinstance(state.get("history"), list) else []
    epoch = state.get("epoch") if isinstance(state.get("epoch"), int) else None
    last = history[epoch - 1] if epoch and 0 < epoch <= len(history) and isinstance(history[epoch - 1], dict) else {}
    about = {
        "epoch": epoch,
        "monitor": config.monitor,
        "best_metric": state.get("best_metric"),
        "train_loss": last.get("train_loss"),
        "val_loss": last.get("val_loss"),
    }
    scoring = Scoring(
        str(data) if data is not None else config.data, config.image_size, config.threshold, config.cache_dir
    )
    return Pipeline(TorchPredictor(source, state=state), refine), scoring, about


def probabilities_of(
    pipeline: Pipeline, images: torch.Tensor, batch_size: int = 32, progress: bool = False
) -> np.ndarray:
    """uint8 (N,3,S,S) -> view-averaged probabilities (N,1,S,S), in batches."""
    array = images.numpy()
    chunks = range(0, len(array), batch_size)
    return np.concatenate(
        [pipeline.probabilities(array[i : i + batch_size]) for i in tqdm(chunks, disable=not progress, desc="predict")]
    )


def score_model_resolution(pipeline: Pipeline, probabilities: np.ndarray, cached: CachedSplit) -> MetricAccumulator:
    size = (pipeline.image_size, pipeline.image_size)
    predicted = torch.stack([torch.from_numpy(pipeline.mask(p[0], size))[None] for p in probabilities])
    metrics = MetricAccumulator(pipeline.threshold)
    metrics.update_binary(predicted, cached.masks)
    return metrics


def score_source_resolution(
    pipeline: Pipeline, probabilities: np.ndarray, data, split: str, ids: list[str]
) -> MetricAccumulator:
    """Each prediction brought to its image's stored size (as predict does) and scored against the full mask."""
    masks = {pair.id: pair.mask for pair in find_pairs(data, split)[0]}
    metrics = MetricAccumulator(pipeline.threshold)
    for image_id, p in zip(ids, probabilities):
        truth, _ = inspect_mask(masks[image_id])
        predicted = pipeline.mask(p[0], (truth.shape[1], truth.shape[0]))
        metrics.update_binary(torch.from_numpy(predicted)[None, None], torch.from_numpy(truth)[None, None])
    return metrics


def load_validation(source: str | os.PathLike, scoring: Scoring) -> CachedSplit:
    """The run's own validation images (its split.json), from the training split: where a refinement may be chosen."""
    run = RunDir.of(source)
    if not run.split.is_file():
        raise LesionsegError(f"{run.split}: not found; validation images are known only beside a run's checkpoint")
    wanted = run.read_split()["val"]
    train = load_split(scoring.data, "train", scoring.image_size, scoring.cache_dir, quiet=True)
    index = {image_id: n for n, image_id in enumerate(train.ids)}
    missing = [image_id for image_id in wanted if image_id not in index]
    if missing:
        raise LesionsegError(
            f"{run.split}: validation image {missing[0]} is not in {scoring.data}'s training split"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    return train.subset([index[image_id] for image_id in wanted])


def images_to_score(source: str | os.PathLike, split: str, scoring: Scoring) -> CachedSplit:
    """The split's images and masks at the model's size; "val": the run's own validation images."""
    if split == "val":
        return load_validation(source, scoring)
    return load_split(scoring.data, split, scoring.image_size, scoring.cache_dir)


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    data: str | os.PathLike | None = None,
    split: str = "test",
    out: str | os.PathLike | None = None,
    refine: Refinements = Refinements(),
    source_resolution: bool = False,
    batch_size: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    """Metrics of `checkpoint` (a .pt file, a run folder, or an exported .onnx model) on `split`; also at each
    image's own resolution if asked; written to `out`."""
    if out is not None:
        claim_output_folder(out, "metrics.json", {"checkpoint", "split", "metrics"}, ("per_image.csv",), "evaluate")
    pipeline, scoring, about = pipeline_for(checkpoint, data, refine)
    cached = images_to_score(checkpoint, split, scoring)
    probabilities = probabilities_of(pipeline, cached.images, batch_size, progress)
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "split": split,
        "images": len(cached),
        "image_size": scoring.image_size,
        "refinements": refine.name,
        **about,
        **score_probabilities(pipeline, probabilities, cached, scoring.data, split, source_resolution),
    }
    if out is not None:
        write_evaluation(result, Path(out))
    return result


def score_probabilities(
    pipeline: Pipeline, probabilities: np.ndarray, cached: CachedSplit, data, split: str, source_resolution: bool = True
) -> dict[str, Any]:
    """Metrics and per-image rows of `probabilities` for `cached`, at the model's resolution and, if asked, at
    each image's stored size (validation images are read from the training split)."""
    model_res = score_model_resolution(pipeline, probabilities, cached)
    per_image = model_res.per_image()
    result: dict[str, Any] = {"metrics": model_res.compute()}
    if source_resolution:
        stored_split = "train" if split == "val" else split
        source = score_source_resolution(pipeline, probabilities, data, stored_split, cached.ids)
        result["metrics_source_resolution"] = source.compute()
        per_image.update({f"{k}_source": v for k, v in source.per_image().items()})
    rows = [{"id": i, **{k: v[n] for k, v in per_image.items()}} for n, i in enumerate(cached.ids)]
    for row, p in zip(rows, probabilities):  # what the quality estimate reads, for fitting it and for checking it
        values = features(p[0], pipeline.threshold)
        row.update({f"q_{k}": v for k, v in values.items()})
        row["quality"] = pipeline.quality.estimate(values) if pipeline.quality else None
    result["per_image"] = rows
    if pipeline.quality:
        truth = "iou_source" if source_resolution else "iou"
        result["quality"] = quality_accuracy([r["quality"] for r in rows], [r[truth] for r in rows])
    return result


def write_evaluation(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    summary = {k: v for k, v in result.items() if k != "per_image"}
    rows = result["per_image"]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(out / "per_image.csv", lambda handle: handle.write(text.getvalue().encode()), "scores")
    write_atomically(out / "metrics.json", lambda handle: handle.write(json.dumps(summary, indent=2).encode()))


def read_per_image(eval_dir: Path) -> list[dict[str, Any]]:
    with open(eval_dir / "per_image.csv", newline="") as handle:
        return [
            {k: v if k == "id" else float(v) if v != "" else None for k, v in row.items()}  # "": no quality estimate
            for row in csv.DictReader(handle)
        ]
