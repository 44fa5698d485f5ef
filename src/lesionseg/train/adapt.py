"""`lesionseg adapt`: follow one clinic's outline from a few of its masks, and prove it on masks it held out.

A clinic's annotators stop where they stop; the model learned where ours did. Two levers, each measured:
the decision threshold (a tighter or looser outline at no cost) and a short, gentle fine-tune of the whole
network with BatchNorm frozen (few images cannot estimate its statistics). Both are judged by K-fold cross-validation
on the clinic's own masks: each image is scored by a model (and a threshold) chosen without it. The best of the
four candidates (as it was, threshold, fine-tune, both) is kept only if its paired gain over the starting model
has a 90 % interval above zero (one-sided 5 %); otherwise the starting model is written back unchanged but for its quality
estimate, which is recalibrated on the clinic's out-of-fold rows so that `quality` means that clinic's Jaccard.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lesionseg.errors import LesionsegError
from lesionseg.files import shown, write_atomically
from lesionseg.segment.quality import QualityModel, features
from lesionseg.train.augmentation import normalize
from lesionseg.train.clinic import THRESHOLDS, Clinic, jaccard_table, load_clinic
from lesionseg.train.config import AdaptRecipe, parse_loss
from lesionseg.train.losses import WeightedSum
from lesionseg.train.precision import bf16_is_native

MIN_MASKS = 10  # below this, five folds of two images cannot tell a gain from noise
CANDIDATES = ("start", "threshold", "finetune", "finetune+threshold")


def augmented(images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator) -> tuple:
    """The same random flip and quarter turn for each image and its mask: a dermoscopy photo has no up."""
    turns = int(torch.randint(4, (1,), generator=generator))
    images, masks = torch.rot90(images, turns, (2, 3)), torch.rot90(masks, turns, (2, 3))
    if torch.rand(1, generator=generator) < 0.5:
        images, masks = images.flip(3), masks.flip(3)
    return images, masks


def frozen_batchnorm(model: nn.Module) -> nn.Module:
    """Train mode everywhere but BatchNorm, which keeps the statistics it shipped with."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    return model


def finetune(start: nn.Module, images: torch.Tensor, masks: torch.Tensor, recipe: AdaptRecipe) -> nn.Module:
    """A copy of `start` fine-tuned on (N,3,S,S) uint8 images and (N,1,S,S) masks; `start` is not touched."""
    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    model = frozen_batchnorm(copy.deepcopy(start)).to(memory_format=torch.channels_last)
    fast = bf16_is_native()  # bf16 autocast where the CPU has it (AMX, AVX512-BF16): measured to hold accuracy
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    loss_fn = WeightedSum(parse_loss(recipe.loss))
    for _ in range(recipe.epochs):
        order = torch.randperm(len(images), generator=generator)
        for start_at in range(0, len(order), recipe.batch_size):
            batch = order[start_at : start_at + recipe.batch_size]
            x, y = augmented(images[batch], masks[batch], generator)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast):
                logits = model(normalize(x).contiguous(memory_format=torch.channels_last))
            loss = loss_fn(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.to(memory_format=torch.contiguous_format).eval()


def probabilities(model: nn.Module, images: torch.Tensor, batch_size: int = 32) -> np.ndarray:
    """(N,3,S,S) uint8 -> (N,S,S) float32 lesion probabilities."""
    model.eval()
    with torch.inference_mode():
        chunks = [
            torch.sigmoid(model(normalize(images[i : i + batch_size]))) for i in range(0, len(images), batch_size)
        ]
    return torch.cat(chunks)[:, 0].numpy()


def fold_of(count: int, folds: int, seed: int) -> np.ndarray:
    """Each image's fold, a seeded shuffle cut into `folds` nearly equal parts."""
    order = np.random.default_rng(seed).permutation(count)
    fold = np.empty(count, int)
    for k, part in enumerate(np.array_split(order, folds)):
        fold[part] = k
    return fold


def cross_fitted(table: np.ndarray, fold: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each image's Jaccard at the threshold chosen on the other folds' images, and that threshold's index."""
    chosen = np.empty(len(fold), int)
    for k in np.unique(fold):
        chosen[fold == k] = int(np.argmax(table[fold != k].mean(axis=0)))
    return table[np.arange(len(fold)), chosen], chosen


def paired_interval(difference: np.ndarray, seed: int = 0, resamples: int = 10_000) -> tuple[float, float]:
    """90 % bootstrap interval of a mean paired difference: its lower end above zero is a one-sided test at 5 %
    that the gain is real (25 masks with uneven per-image gains leave a two-sided 95 % interval too wide to
    accept a +0.06 gain: benchmarks/results/adapt)."""
    rng = np.random.default_rng(seed)
    means = difference[rng.integers(0, len(difference), (resamples, len(difference)))].mean(axis=1)
    return float(np.quantile(means, 0.05)), float(np.quantile(means, 0.95))


@dataclass
class Verdict:
    """What cross-validation says: per-image Jaccard of each candidate on images it did not see, and the choice."""

    per_image: dict[str, list[float]]
    chosen: str
    gain: float
    interval: tuple[float, float]
    threshold: float
    maps: dict[str, np.ndarray]  # "start", "finetune": (N,S,S) probabilities, the latter from fold models
    fold: np.ndarray  # each image's fold

    @property
    def out_of_fold_maps(self) -> np.ndarray:
        """The chosen candidate's probabilities, each from a model that did not see its image."""
        return self.maps["finetune" if self.chosen.startswith("finetune") else "start"]


def cross_validate(start: nn.Module, clinic: Clinic, threshold: float, recipe: AdaptRecipe, progress=None) -> Verdict:
    """K-fold: fine-tune on K-1 folds, predict the held-out one; thresholds chosen on the other folds alone."""
    fold = fold_of(len(clinic.ids), min(recipe.folds, len(clinic.ids)), recipe.seed)
    start_maps = probabilities(start, clinic.images)
    tuned_maps = np.empty_like(start_maps)
    for k in np.unique(fold):
        model = finetune(start, clinic.images[fold != k], clinic.masks[fold != k], recipe)
        tuned_maps[fold == k] = probabilities(model, clinic.images[fold == k])
        if progress:
            progress(f"fold {k + 1} of {fold.max() + 1}")
    own = int(np.argmin(np.abs(np.asarray(THRESHOLDS) - threshold)))
    tables = {"start": jaccard_table(start_maps, clinic.truths), "finetune": jaccard_table(tuned_maps, clinic.truths)}
    per_image = {
        "start": tables["start"][:, own],
        "threshold": cross_fitted(tables["start"], fold)[0],
        "finetune": tables["finetune"][:, own],
        "finetune+threshold": cross_fitted(tables["finetune"], fold)[0],
    }
    best = max(CANDIDATES, key=lambda name: per_image[name].mean())
    difference = per_image[best] - per_image["start"]
    interval = paired_interval(difference, recipe.seed)
    chosen = best if interval[0] > 0 else "start"
    table = tables["finetune" if chosen.startswith("finetune") else "start"]
    final = THRESHOLDS[int(np.argmax(table.mean(axis=0)))] if chosen.endswith("threshold") else threshold
    return Verdict(
        {name: values.tolist() for name, values in per_image.items()},
        chosen,
        float(difference.mean()) if chosen != "start" else 0.0,
        interval,
        float(final),
        {"start": start_maps, "finetune": tuned_maps},
        fold,
    )


def calibration_line(kind: str, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(a, b) of `a + b * estimate`: as shipped (0, 1), shifted by the mean error, or least squares with b >= 0."""
    if kind == "as shipped":
        return 0.0, 1.0
    if kind == "shifted" or np.ptp(x) == 0:
        return float((y - x).mean()), 1.0
    b = max(0.0, float(np.polyfit(x, y, 1)[0]))
    return float(y.mean() - b * x.mean()), b


def recalibrated(quality: QualityModel | None, maps: np.ndarray, threshold: float, truth: np.ndarray, fold: np.ndarray):
    """The estimate's map to Jaccard refitted to the clinic on out-of-fold rows: as shipped, shifted by its mean
    error, or a least-squares line (order kept), whichever has the lowest mean absolute error when each fold is
    calibrated on the others; 25 rows cannot carry more than two numbers."""
    if quality is None:
        return None, {}
    estimate = np.array([quality.estimate(features(p, threshold)) for p in maps])
    errors = {}
    for kind in ("as shipped", "shifted", "line"):
        held_out = np.empty_like(estimate)
        for k in np.unique(fold):
            a, b = calibration_line(kind, estimate[fold != k], truth[fold != k])
            held_out[fold == k] = np.clip(a + b * estimate[fold == k], 0, 1)
        errors[kind] = float(np.abs(held_out - truth).mean())
    chosen = min(errors, key=errors.get)
    a, b = calibration_line(chosen, estimate, truth)
    knots = np.clip(a + b * np.asarray(quality.knots_y), 0, 1).tolist()
    note = f"{quality.fitted_on}; {chosen} on {len(truth)} clinic masks (a {a:+.3f}, b {b:.3f})"
    report = {
        "chosen": chosen,
        "mae_out_of_fold": errors,
        "mean_estimate_before": float(estimate.mean()),
        "mean_truth": float(truth.mean()),
    }
    return replace(quality, knots_y=knots, fitted_on=note[:500]), report


def write_report(out: Path, report: dict) -> Path:
    text = json.dumps(report, indent=1, allow_nan=False)
    return write_atomically(out / "adapt.json", lambda handle: handle.write(text.encode()), "adapt report")


def summary_line(report: dict) -> str:
    """One line: what adapting did, measured on the clinic's held-out masks."""
    before, after = report["jaccard_before"], report["jaccard_after"]
    low, high = report["gain_interval"]
    what = {
        "start": "kept the starting model (no candidate beat it with a 90 % interval above zero)",
        "threshold": f"threshold {report['threshold']:.3f}",
        "finetune": "fine-tuned",
        "finetune+threshold": f"fine-tuned, threshold {report['threshold']:.3f}",
    }[report["chosen"]]
    return (
        f"adapted on {report['masks']} masks: {what}; held-out Jaccard {before:.3f} -> {after:.3f} "
        f"(gain {after - before:+.3f}, best candidate's 90 % interval {low:+.3f} to {high:+.3f})"
    )


def run_adapt(
    data: str | Path,
    out: str | Path,
    start: str | Path | None = None,
    recipe: AdaptRecipe = AdaptRecipe(),
    progress=None,
) -> dict:
    """Adapt `start` (the released model by default) to the clinic in `data`; write OUT/model.onnx (and its int8
    twin when it stays within 0.005), OUT/adapt.json; return the report."""
    from lesionseg.train.adapt_files import prepare_out, starting_model, write_models

    began = time.perf_counter()
    out = prepare_out(Path(out))
    model, config, source = starting_model(start)
    clinic = load_clinic(data, config.image_size)
    if len(clinic.ids) < MIN_MASKS:
        raise LesionsegError(f"{shown(data)}: {len(clinic.ids)} image/mask pairs; adapt needs at least {MIN_MASKS}")
    verdict = cross_validate(model, clinic, config.threshold, recipe, progress)
    truth = np.asarray(verdict.per_image[verdict.chosen])
    quality, quality_report = recalibrated(
        source.quality, verdict.out_of_fold_maps, verdict.threshold, truth, verdict.fold
    )
    final = finetune(model, clinic.images, clinic.masks, recipe) if verdict.chosen.startswith("finetune") else model
    report = {
        "data": str(data),
        "started_from": source.version,
        "started_from_name": source.name,
        "masks": len(clinic.ids),
        "chosen": verdict.chosen,
        "threshold": verdict.threshold,
        "jaccard_before": float(np.mean(verdict.per_image["start"])),
        "jaccard_after": float(np.mean(truth)),
        "gain_interval": list(verdict.interval),
        "candidates": {name: float(np.mean(v)) for name, v in verdict.per_image.items()},
        "per_image": {"ids": clinic.ids, **verdict.per_image},
        "quality": quality_report,
        "recipe": asdict(recipe),
    }
    report["files"] = write_models(
        out, final, replace(config, threshold=verdict.threshold), source, quality, report, data
    )
    report["seconds"] = time.perf_counter() - began
    write_report(out, report)
    return report
