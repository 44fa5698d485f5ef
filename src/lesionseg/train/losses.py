"""Losses by name, from segmentation_models_pytorch; all take logits (B,1,H,W) and {0,1} targets."""

from __future__ import annotations

from collections.abc import Callable

import torch
from segmentation_models_pytorch import losses as smp_losses
from torch import nn

from lesionseg.train.config import check_loss

LOSSES: dict[str, Callable[[], nn.Module]] = {
    "bce": smp_losses.SoftBCEWithLogitsLoss,
    # the paper's DiceLoss = 1 - 2|P∩G| / (|P|+|G|) on soft predictions
    "dice": lambda: smp_losses.DiceLoss("binary", from_logits=True),
    "focal": lambda: smp_losses.FocalLoss("binary"),
    "lovasz": lambda: smp_losses.LovaszLoss("binary", per_image=True),
    "tversky": lambda: smp_losses.TverskyLoss("binary", from_logits=True, alpha=0.3, beta=0.7),
}


class WeightedSum(nn.Module):
    """sum_i w_i * loss_i, e.g. {"bce": 1.0, "dice": 0.1} is the paper's Model 1 loss."""

    def __init__(self, weights: dict[str, float]) -> None:
        super().__init__()
        check_loss(weights)
        self.weights = dict(weights)
        self.terms = nn.ModuleDict({name: LOSSES[name]() for name in weights})

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(w * self.terms[name](logits, target) for name, w in self.weights.items())
