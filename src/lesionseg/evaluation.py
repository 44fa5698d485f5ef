"""Score a trained checkpoint on a split, at the model's resolution and at each image's own.

Inference refinements are options, each measured on its own: flip test-time augmentation, rotation test-time
augmentation, keeping the largest connected component, filling holes. They may be chosen on the run's own
validation images (`split="val"`), never on the test split.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch.nn import functional as F
from tqdm.auto import tqdm

from lesionseg.config import TrainConfig
from lesionseg.data import CachedSplit, find_pairs, load_split, normalize
from lesionseg.errors import LesionsegError
from lesionseg.images import inspect_mask
from lesionseg.metrics import MetricAccumulator
from lesionseg.prediction import OnnxPredictor, Predictor, average_over_views, inference_views
from lesionseg.training import load_checkpoint, model_from_checkpoint


@dataclass(frozen=True)
class Refinements:
    tta: bool = False  # average over identity, horizontal and vertical flips
    rotations: bool = False  # also the 90/180/270 degree turns (a dermoscope has no "up"); with tta, all 8 symmetries
    largest_component: bool = False  # a dermoscopy image shows one lesion
    fill_holes: bool = False  # a lesion has no holes

    @property
    def views(self) -> list[tuple[int, bool]]:
        return inference_views(self.tta, self.rotations)

    @property
    def name(self) -> str:
        on = [k for k, v in asdict(self).items() if v]
        return "+".join(on) if on else "plain"


@torch.no_grad()
def batched_probabilities(model: torch.nn.Module | Predictor, images: torch.Tensor, batch_size: int = 32,
                          progress: bool = False) -> torch.Tensor:
    """uint8 (N,3,S,S) -> probabilities (N,1,S,S), in batches, from a PyTorch model or a predictor (ONNX)."""
    if isinstance(model, torch.nn.Module):
        model.eval()
        run = lambda x: torch.sigmoid(model(normalize(x)))  # noqa: E731
    else:
        run = lambda x: torch.from_numpy(model(x.numpy()))  # noqa: E731
    chunks = range(0, len(images), batch_size)
    return torch.cat([run(images[i : i + batch_size]) for i in tqdm(chunks, disable=not progress, desc="predict")])


@torch.no_grad()
def predict_probabilities(model: torch.nn.Module | Predictor, images: torch.Tensor, tta: bool = False,
                          batch_size: int = 32, progress: bool = False, rotations: bool = False) -> torch.Tensor:
    """uint8 (N,3,S,S) -> probabilities (N,1,S,S); with `tta` and/or `rotations`, the mean over the test-time
    views (`prediction.inference_views`), each turned back: the same averaging predict and serve use."""
    views = inference_views(tta, rotations)
    if len(views) == 1:
        return batched_probabilities(model, images, batch_size, progress)
    run = lambda x: batched_probabilities(model, torch.from_numpy(x), batch_size).numpy()  # noqa: E731
    chunks = range(0, len(images), batch_size)
    return torch.cat([torch.from_numpy(average_over_views(run, images[i : i + batch_size].numpy(), views))
                      for i in tqdm(chunks, disable=not progress, desc="predict")])


def binarize(probability: np.ndarray, threshold: float, refine: Refinements) -> np.ndarray:
    """(H,W) probabilities -> boolean mask, post-processed as asked."""
    mask = probability >= threshold
    if refine.largest_component and mask.any():
        labels, count = ndimage.label(mask)
        if count > 1:
            sizes = ndimage.sum_labels(mask, labels, index=range(1, count + 1))
            mask = labels == 1 + int(np.argmax(sizes))
    if refine.fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    return mask


def score_model_resolution(probabilities: torch.Tensor, cached: CachedSplit, threshold: float, refine: Refinements) -> MetricAccumulator:
    metrics = MetricAccumulator(threshold)
    predicted = torch.stack([torch.from_numpy(binarize(p[0].numpy(), threshold, refine))[None] for p in probabilities])
    metrics.update_binary(predicted, cached.masks)
    return metrics


def score_source_resolution(probabilities: torch.Tensor, data, split: str, threshold: float, refine: Refinements,
                            ids: list[str]) -> MetricAccumulator:
    """Upsample each prediction to its image's stored size and score it against the full-size mask."""
    masks = {pair.id: pair.mask for pair in find_pairs(data, split)[0]}
    metrics = MetricAccumulator(threshold)
    for image_id, p in zip(ids, probabilities):
        truth, _ = inspect_mask(masks[image_id])
        full = F.interpolate(p[None], size=truth.shape, mode="bilinear", align_corners=False)[0, 0].numpy()
        predicted = binarize(full, threshold, refine)
        metrics.update_binary(torch.from_numpy(predicted)[None, None], torch.from_numpy(truth)[None, None])
    return metrics


def load_for_evaluation(source: str | os.PathLike, data) -> tuple[Any, TrainConfig, dict[str, Any]]:
    """The model to score, the settings scoring needs (size, threshold, data), and what the checkpoint says of its
    training. An ONNX file knows its size and threshold but not its data: --data is then required."""
    if Path(source).suffix.lower() == ".onnx":
        if data is None:
            raise LesionsegError(f"{source}: an ONNX model does not record its data folder; pass --data")
        predictor = OnnxPredictor(source)
        config = TrainConfig(image_size=predictor.image_size, threshold=predictor.threshold, data=str(data))
        return predictor, config, dict.fromkeys(("epoch", "monitor", "best_metric", "train_loss", "val_loss"))
    state = load_checkpoint(source)
    model, config = model_from_checkpoint(state)
    last = state["history"][state["epoch"] - 1] if state["history"] else {}
    return model, config, {"epoch": state["epoch"], "monitor": config.monitor, "best_metric": state["best_metric"],
                           "train_loss": last.get("train_loss"), "val_loss": last.get("val_loss")}


def load_validation(checkpoint: str | os.PathLike, data, config: TrainConfig) -> CachedSplit:
    """The run's own validation images (its split.json), from the training split: where a refinement may be chosen."""
    run = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
    if not (run / "split.json").is_file():
        raise LesionsegError(f"{run / 'split.json'}: not found; validation images are known only beside a run's checkpoint")
    wanted = json.loads((run / "split.json").read_text())["val"]
    train = load_split(data, "train", config.image_size, config.cache_dir, quiet=True)
    index = {image_id: n for n, image_id in enumerate(train.ids)}
    missing = [image_id for image_id in wanted if image_id not in index]
    if missing:
        raise LesionsegError(f"{run / 'split.json'}: validation image {missing[0]} is not in {data}'s training split"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return train.subset([index[image_id] for image_id in wanted])


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
    model, config, about = load_for_evaluation(checkpoint, data)
    data = data if data is not None else config.data
    cached = images_to_score(checkpoint, data, split, config)
    probabilities = predict_probabilities(model, cached.images, refine.tta, batch_size, progress, refine.rotations)
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint), "split": split, "images": len(cached), "image_size": config.image_size,
        "refinements": refine.name, **about,
        **score_probabilities(probabilities, cached, data, split, config.threshold, refine, source_resolution),
    }
    if out is not None:
        write_evaluation(result, Path(out))
    return result


def images_to_score(checkpoint: str | os.PathLike, data, split: str, config: TrainConfig) -> CachedSplit:
    """The split's images and masks at the model's size; "val": the run's own validation images."""
    if split == "val":
        return load_validation(checkpoint, data, config)
    return load_split(data, split, config.image_size, config.cache_dir)


def score_probabilities(probabilities: torch.Tensor, cached: CachedSplit, data, split: str, threshold: float,
                        refine: Refinements, source_resolution: bool = True) -> dict[str, Any]:
    """Metrics and per-image rows of `probabilities` for `cached`, at the model's resolution and, if asked, at
    each image's stored size (validation images are read from the training split)."""
    model_res = score_model_resolution(probabilities, cached, threshold, refine)
    per_image = model_res.per_image()
    result: dict[str, Any] = {"metrics": model_res.compute()}
    if source_resolution:
        source = score_source_resolution(probabilities, data, "train" if split == "val" else split, threshold,
                                         refine, cached.ids)
        result["metrics_source_resolution"] = source.compute()
        per_image.update({f"{k}_source": v for k, v in source.per_image().items()})
    result["per_image"] = [{"id": i, **{k: v[n] for k, v in per_image.items()}} for n, i in enumerate(cached.ids)]
    return result


def write_evaluation(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    summary = {k: v for k, v in result.items() if k != "per_image"}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    rows = result["per_image"]
    with open(out / "per_image.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def read_per_image(eval_dir: Path) -> list[dict[str, Any]]:
    with open(eval_dir / "per_image.csv", newline="") as handle:
        return [{k: (v if k == "id" else float(v)) for k, v in row.items()} for row in csv.DictReader(handle)]
