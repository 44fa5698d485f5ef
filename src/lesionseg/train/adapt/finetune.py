"""The fine-tune adapt runs: small and gentle by construction, so that adapting can be the default.

The shipped file's BatchNorm is folded into its convolutions (`unfold.py`): nothing renormalizes a layer's output
after a weight moves, so the network is far more sensitive to each step than the one that trained. Measured on
stand-in clinics (docs/adapt.md): at AdamW 1e-4 the fine-tune lost 0.03 Jaccard on masks drawn like our own and
its own training masks got worse after 60 steps; at 1e-5 it kept the start on those and still learned a tighter
outline. So: a low rate, lower still for the encoder (ImageNet and 10,000 lesions taught it what a lesion looks
like; a clinic's style is where the border goes, which the decoder draws), a fixed number of steps whatever the
number of masks (10 and 100 masks get the same amount of change), and the flips and quarter turns a dermoscopy
photo allows.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from lesionseg.train.augmentation import normalize
from lesionseg.train.config import AdaptRecipe, parse_loss
from lesionseg.train.losses import WeightedSum
from lesionseg.train.precision import bf16_is_native


def augmented(images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator) -> tuple:
    """The same random flip and quarter turn for each image and its mask: a dermoscopy photo has no up."""
    turns = int(torch.randint(4, (1,), generator=generator))
    images, masks = torch.rot90(images, turns, (2, 3)), torch.rot90(masks, turns, (2, 3))
    if torch.rand(1, generator=generator) < 0.5:
        images, masks = images.flip(3), masks.flip(3)
    return images, masks


def frozen_batchnorm(model: nn.Module) -> nn.Module:
    """Train mode everywhere but BatchNorm, which keeps the statistics it shipped with (folded: the identity)."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    return model


def parameter_groups(model: nn.Module, recipe: AdaptRecipe) -> list[dict]:
    """The decoder at the recipe's rate, the encoder at a fraction of it (or not at all)."""
    encoder = [p for name, p in model.named_parameters() if name.startswith("encoder.")]
    decoder = [p for name, p in model.named_parameters() if not name.startswith("encoder.")]
    if recipe.encoder_lr_scale == 0:
        for p in encoder:
            p.requires_grad_(False)  # no gradient through the encoder's weights: faster as well
        return [{"params": decoder, "lr": recipe.lr}]
    return [{"params": decoder, "lr": recipe.lr}, {"params": encoder, "lr": recipe.lr * recipe.encoder_lr_scale}]


def batches(count: int, recipe: AdaptRecipe, generator: torch.Generator):
    """`recipe.steps` batches of indices: shuffled passes over the masks, cut into batches, as many as needed."""
    step = 0
    while True:
        order = torch.randperm(count, generator=generator)
        for at in range(0, count, recipe.batch_size):
            if step == recipe.steps:
                return
            yield order[at : at + recipe.batch_size]
            step += 1


def finetune(start: nn.Module, images: torch.Tensor, masks: torch.Tensor, recipe: AdaptRecipe) -> nn.Module:
    """A copy of `start` fine-tuned on (N,3,S,S) uint8 images and (N,1,S,S) masks; `start` is not touched."""
    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    model = frozen_batchnorm(copy.deepcopy(start)).to(memory_format=torch.channels_last)
    fast = bf16_is_native()  # bf16 autocast where the CPU has it (AMX, AVX512-BF16): measured to hold accuracy
    optimizer = torch.optim.AdamW(parameter_groups(model, recipe), weight_decay=recipe.weight_decay)
    loss_fn = WeightedSum(parse_loss(recipe.loss))
    for batch in batches(len(images), recipe, generator):
        x, y = augmented(images[batch], masks[batch], generator)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast):
            logits = model(normalize(x).contiguous(memory_format=torch.channels_last))
        loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    for p in model.parameters():
        p.requires_grad_(True)
    return model.to(memory_format=torch.contiguous_format).eval()


def probabilities(model: nn.Module, images: torch.Tensor, batch_size: int = 32) -> np.ndarray:
    """(N,3,S,S) uint8 -> (N,S,S) float32 lesion probabilities."""
    model.eval()
    with torch.inference_mode():
        chunks = [
            torch.sigmoid(model(normalize(images[i : i + batch_size]))) for i in range(0, len(images), batch_size)
        ]
    return torch.cat(chunks)[:, 0].numpy()
