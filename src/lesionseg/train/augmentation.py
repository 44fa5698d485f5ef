"""Cached uint8 samples -> augmented, normalized tensors: the joint image/mask presets of training and evaluation
(torchvision transforms v2, the mask a `tv_tensors.Mask`), and the dataset that applies them, seeded per sample."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from lesionseg.train.data import CachedSplit
from lesionseg.train.models import IMAGENET_MEAN, IMAGENET_STD


class TrainPreset:
    """Training augmentation, applied identically to image and mask: flip, rotation (and zoom), colour on the image
    alone, then normalize. Without zoom and colour, the paper's flip and rotation exactly (the same random draws)."""

    def __init__(self, hflip: bool = True, rotation: float = 60.0, scale: float = 0.0, colour: float = 0.0) -> None:
        steps: list[v2.Transform] = []
        bilinear = v2.InterpolationMode.BILINEAR
        if hflip:
            steps.append(v2.RandomHorizontalFlip(0.5))
        # masks are turned and zoomed with nearest interpolation by v2 (tv_tensors.Mask), so they stay binary
        if scale:
            steps.append(v2.RandomAffine(rotation, scale=(1 - scale, 1 + scale), interpolation=bilinear))
        elif rotation:
            steps.append(v2.RandomRotation(rotation, interpolation=bilinear))
        if colour:  # other clinics, other devices, other light: a mask does not change with colour (v2 leaves it)
            steps.append(v2.ColorJitter(colour, colour, colour, colour / 4))
        self.augment = v2.Compose(steps) if steps else v2.Identity()
        self.normalize = EvalPreset()

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.augment(tv_tensors.Image(image), tv_tensors.Mask(mask))
        return self.normalize(image, mask)


class EvalPreset:
    """uint8 image -> ImageNet-normalized float; {0,1} mask -> float."""

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return normalize(image), mask.as_subclass(torch.Tensor).float()


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (...,3,H,W) -> float ImageNet-normalized."""
    x = images.as_subclass(torch.Tensor).float().div_(255)
    return TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD)


class SegmentationDataset(Dataset):
    """Samples of a cached split: (image (3,S,S) float, mask (1,S,S) float in {0,1}, or in [0,1] if soft).

    With a `seed`, each sample's augmentation is drawn from its own generator seeded by (seed, epoch,
    index): the same sample gets the same transform whichever process, worker or resumed run asks.
    """

    def __init__(self, split: CachedSplit, transform, seed: int | None = None) -> None:
        self.split = split
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.split.images[index], self.split.masks[index]
        if self.seed is None:
            return self.transform(image, mask)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, self.epoch, index)) & 0x7FFFFFFF)
            return self.transform(image, mask)
