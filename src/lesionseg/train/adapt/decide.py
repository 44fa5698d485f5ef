"""Which adaptation to keep: cross-validation on the clinic's own masks, guarding against a clear loss.

The earlier rule chose the best of four candidates by 5-fold cross-validation and kept it only if a one-sided
interval of its gain cleared zero. On 25 masks that has little power and a winner's curse: on a hidden clinic it
threw away gains of 0.03 to 0.05 (issue 38). Now the decision only has to catch a clear loss, between two
candidates that are each safe by construction:
- the border: the starting model with its outline refitted, a threshold and an offset of the outline by a share of
  the lesion's radius (`clinic.BORDERS`; two numbers, the style of annotators who draw tighter or looser);
- the fine-tune (`finetune.py`, gentle by its recipe) with its own border fitted the same way.
Both are scored out of fold (the fine-tune from fold models, each border fitted on the other folds). A candidate
whose cross-validated mean gain over the starting model is below -LOSS_MARGIN is refused; of those left, the
fine-tune is kept where it gains more than the border by LOSS_MARGIN, else the border (which may leave the outline
where it was: then the start is kept as it is); if neither is left, the start. Two candidates that share most of
their errors give a small winner's curse; docs/adapt.md measures the false-keep and false-adapt rates.

The gain is measured on the masks a person corrected; masks accepted as the model drew them teach no style (they
are the starting model's own output, which it scores 1.0 on) and would only dilute it, so they train but do not
judge, unless no mask was corrected at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from lesionseg.train.adapt.clinic import BORDERS, Clinic, border_index, border_table
from lesionseg.train.adapt.finetune import finetune, probabilities
from lesionseg.train.config import AdaptRecipe

LOSS_MARGIN = 0.005  # a cross-validated mean loss larger than this refuses a candidate (docs/adapt.md: the rates)
CHOICES = ("finetune", "border", "start")


def fold_of(count: int, folds: int, seed: int) -> np.ndarray:
    """Each image's fold, a seeded shuffle cut into `folds` nearly equal parts."""
    order = np.random.default_rng(seed).permutation(count)
    fold = np.empty(count, int)
    for k, part in enumerate(np.array_split(order, folds)):
        fold[part] = k
    return fold


def fitted_border(table: np.ndarray, default: int) -> int:
    """The border (a table column) with the best mean Jaccard, kept only if it beats `default` (the start's own
    border) by more than LOSS_MARGIN: where the masks show no style the optimum is flat, and a border fitted to
    25 masks' noise (a threshold of 0.2, say) loses on the next images."""
    best = int(np.argmax(table.mean(axis=0)))
    return best if table[:, best].mean() - table[:, default].mean() > LOSS_MARGIN else default


def cross_fitted(
    table: np.ndarray, fold: np.ndarray, judged: np.ndarray | None = None, default: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Each image's Jaccard at the border (a table column) fitted on the other folds' (judged) images by
    `fitted_border`, and its index."""
    judged = np.ones(len(fold), bool) if judged is None else judged
    chosen = np.empty(len(fold), int)
    for k in np.unique(fold):
        others = (fold != k) & judged
        chosen[fold == k] = fitted_border(table[others if others.any() else fold != k], default)
    return table[np.arange(len(fold)), chosen], chosen


def paired_interval(difference: np.ndarray, seed: int = 0, resamples: int = 10_000) -> tuple[float, float]:
    """90 % bootstrap interval of a mean paired difference, reported beside the decision (not its rule)."""
    rng = np.random.default_rng(seed)
    means = difference[rng.integers(0, len(difference), (resamples, len(difference)))].mean(axis=1)
    return float(np.quantile(means, 0.05)), float(np.quantile(means, 0.95))


@dataclass
class Verdict:
    """What cross-validation says: per-image Jaccard of each candidate on images it did not see, and the choice."""

    per_image: dict[str, np.ndarray]  # "start", "border", "finetune": each image, out of fold
    judged: np.ndarray  # the images whose Jaccard decides (corrected ones)
    chosen: str
    threshold: float
    border_offset: float
    maps: dict[str, np.ndarray]  # "start", "finetune": (N,S,S) probabilities, the latter from fold models
    fold: np.ndarray

    def gain(self, name: str) -> float:
        return float((self.per_image[name] - self.per_image["start"])[self.judged].mean())

    def interval(self, name: str, seed: int = 0) -> tuple[float, float]:
        return paired_interval((self.per_image[name] - self.per_image["start"])[self.judged], seed)

    @property
    def out_of_fold_maps(self) -> np.ndarray:
        """The chosen candidate's probabilities, each from a model that did not see its image."""
        return self.maps["finetune" if self.chosen == "finetune" else "start"]


def decided(gains: dict[str, float]) -> str:
    """Of the candidates whose cross-validated gain is not a clear loss, the border unless the fine-tune gains more
    by LOSS_MARGIN; the start where both lose clearly. Within the margin the two cannot be told apart on a few masks,
    and the border (two numbers) varies less from one draw of masks to the next than millions of weights do: the
    simpler model within the noise of the best, as the one-standard-error rule of model selection chooses."""
    admissible = [name for name in CHOICES[:-1] if gains[name] >= -LOSS_MARGIN]
    if len(admissible) == 2:
        return "finetune" if gains["finetune"] > gains["border"] + LOSS_MARGIN else "border"
    return admissible[0] if admissible else "start"


def cross_validate(start: nn.Module, clinic: Clinic, threshold: float, recipe: AdaptRecipe, progress=None) -> Verdict:
    """K-fold: fine-tune on K-1 folds, predict the held-out one; borders chosen on the other folds alone."""
    fold = fold_of(len(clinic.ids), min(recipe.folds, len(clinic.ids)), recipe.seed)
    start_maps = probabilities(start, clinic.images)
    tuned_maps = np.empty_like(start_maps)
    for k in np.unique(fold):
        model = finetune(start, clinic.images[fold != k], clinic.masks[fold != k], recipe)
        tuned_maps[fold == k] = probabilities(model, clinic.images[fold == k])
        if progress:
            progress(f"fold {k + 1} of {fold.max() + 1}")
    judged = clinic.corrected if clinic.corrected.any() else np.ones(len(fold), bool)
    tables = {"start": border_table(start_maps, clinic.truths), "finetune": border_table(tuned_maps, clinic.truths)}
    own = border_index(0.0, threshold)
    per_image = {
        "start": tables["start"][:, own],
        "border": cross_fitted(tables["start"], fold, judged, own)[0],
        "finetune": cross_fitted(tables["finetune"], fold, judged, own)[0],
    }
    gains = {name: float((per_image[name] - per_image["start"])[judged].mean()) for name in CHOICES}
    chosen = decided(gains)
    offset, final = 0.0, threshold
    if chosen != "start":
        offset, final = BORDERS[fitted_border(tables["finetune" if chosen == "finetune" else "start"][judged], own)]
    maps = {"start": start_maps, "finetune": tuned_maps}
    return Verdict(per_image, judged, chosen, float(final), float(offset), maps, fold)
