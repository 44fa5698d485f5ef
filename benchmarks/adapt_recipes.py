"""Which fine-tune `lesionseg adapt` runs: recipe variants on stand-in clinics, one draw of 25 masks each.

Each variant fine-tunes the released model on the same 25 masks of the external HAM10000 split (made tighter or
looser, or as drawn: `adapt.py --style`) and is scored on the other images (the first 400 by default). This
chose adapt's v4 recipe (docs/adapt.md#the-recipe); the exploration's rows are in results/adapt_recipes/.

    .venv/bin/python benchmarks/adapt_recipes.py \
        --variants '{"A": {"steps": 60, "lr": 1e-5}, "L1": {"steps": 60, "lr": 1e-4, "bn": "live"}}' \
        --styles 0 -0.15 --external runs/ham10000-split/external/test \
        --metadata ../shared/data/ham10000-200/metadata.csv
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np
import torch
from torch import nn

from adapt import held_out, lesions_of, own_index, restyled
from lesionseg.segment.predictors import released_model
from lesionseg.train.adapt.clinic import jaccard_table, load_clinic
from lesionseg.train.adapt.finetune import augmented, batches, frozen_batchnorm, probabilities
from lesionseg.train.adapt.unfold import model_from_onnx
from lesionseg.train.augmentation import normalize
from lesionseg.train.config import AdaptRecipe, parse_loss
from lesionseg.train.losses import WeightedSum
from lesionseg.train.precision import bf16_is_native


class ChannelScale(nn.Module):
    """weight = stored * scale, the scale fixed per output channel: AdamW's step on `stored` is then a relative
    step on the weight, the same for a channel whose folded weights are 1e-4 as for one whose are 600."""

    def __init__(self, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale)

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored * self.scale

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return weight / self.scale


def channel_scale(weight: torch.Tensor) -> torch.Tensor:
    """Root mean square per output channel (per tensor for a vector), broadcastable to `weight`; 1 where it is 0."""
    if weight.ndim > 1:
        rms = weight.detach().flatten(1).pow(2).mean(1).sqrt().view(-1, *[1] * (weight.ndim - 1))
    else:
        rms = weight.detach().pow(2).mean().sqrt().expand(weight.shape).clone()
    return torch.where(rms > 0, rms, torch.ones_like(rms))


def relative_steps(model: nn.Module) -> nn.Module:
    """Every parameter re-expressed relative to its own scale (per output channel): see ChannelScale."""
    from torch.nn.utils import parametrize

    for module in list(model.modules()):
        for name, parameter in list(module.named_parameters(recurse=False)):
            parametrize.register_parametrization(module, name, ChannelScale(channel_scale(parameter)))
    return model


def absolute_weights(model: nn.Module) -> nn.Module:
    """Undo `relative_steps`: plain parameters holding the trained values."""
    from torch.nn.utils import parametrize

    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return model


def live_batchnorm(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """BatchNorm given the clinic's activation statistics, its scale and shift set so the function is unchanged,
    then trained in train mode ("BatchNorm not frozen" on a file whose BatchNorm was folded away)."""
    stats, hooks = {}, []
    layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for layer in layers:
        hooks.append(layer.register_forward_hook(lambda mod, inp, out: stats.__setitem__(mod, inp[0].detach())))
    model.eval()
    with torch.no_grad():
        model(normalize(images))
    for hook in hooks:
        hook.remove()
    with torch.no_grad():
        for layer in layers:
            x = stats[layer].float()
            mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3))
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)
            layer.weight.copy_(torch.sqrt(var + layer.eps))
            layer.bias.add_(mean)
    return model.train()


def fine_tuned(start, images, masks, steps=60, lr=1e-4, enc_scale=1.0, l2sp=0.0, bs=8, seed=0, loss="bce+dice",
               opt="adamw", train=None, bn="frozen", relative=False) -> nn.Module:  # fmt: skip
    """One variant: which layers learn (`train`), at which rates, with which optimizer, regularizer and BatchNorm."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(start)
    live_batchnorm(model, images) if bn == "live" else frozen_batchnorm(model)
    model = model.to(memory_format=torch.channels_last)
    if relative:
        relative_steps(model)
    if train:
        for name, p in model.named_parameters():
            p.requires_grad_(any(name.startswith(prefix) for prefix in train))
    reference = {name: p.detach().clone() for name, p in model.named_parameters()}
    encoder = [p for n, p in model.named_parameters() if n.startswith("encoder") and p.requires_grad]
    decoder = [p for n, p in model.named_parameters() if not n.startswith("encoder") and p.requires_grad]
    groups = [{"params": encoder, "lr": lr * enc_scale}, {"params": decoder, "lr": lr}]
    optimizer = (
        torch.optim.AdamW(groups, weight_decay=1e-4) if opt == "adamw" else torch.optim.SGD(groups, lr=lr, momentum=0.9)
    )
    loss_fn, fast = WeightedSum(parse_loss(loss)), bf16_is_native()
    for batch in batches(len(images), AdaptRecipe(steps=steps, batch_size=bs), generator):
        x, y = augmented(images[batch], masks[batch], generator)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast):
            logits = model(normalize(x).contiguous(memory_format=torch.channels_last))
        value = loss_fn(logits.float(), y)
        if l2sp:
            value = value + l2sp * sum(
                ((p - reference[n]) ** 2).sum() for n, p in model.named_parameters() if p.requires_grad
            )
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    if relative:
        absolute_weights(model)
    return model.to(memory_format=torch.contiguous_format).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", required=True, help="JSON: {name: keyword arguments of fine_tuned}")
    parser.add_argument("--styles", type=float, nargs="+", default=[0.0, -0.15])
    parser.add_argument("--external", required=True)
    parser.add_argument("--metadata", required=True)
    parser.add_argument("--n", type=int, default=25)
    parser.add_argument("--scored", type=int, default=400, help="held-out images scored (the first ones)")
    args = parser.parse_args()
    variants, lesion = json.loads(args.variants), lesions_of(args.metadata)
    start, config, _ = model_from_onnx(released_model())
    for style in args.styles:
        clinic = load_clinic(args.external, config.image_size)
        clinic.truths = [restyled(t, style) for t in clinic.truths]
        clinic.masks = torch.stack([torch.from_numpy(restyled(m[0].numpy() > 0, style).astype(np.float32))[None]
                                    for m in clinic.masks])  # fmt: skip
        table = jaccard_table(probabilities(start, clinic.images), clinic.truths)
        chosen = np.random.default_rng(1000 * args.n).choice(len(clinic.ids), args.n, replace=False)
        rest, own = held_out(clinic, chosen, lesion)[: args.scored], own_index(config.threshold)
        for name, kwargs in variants.items():
            began = time.perf_counter()
            model = fine_tuned(start, clinic.images[chosen], clinic.masks[chosen], **kwargs)
            scores = jaccard_table(probabilities(model, clinic.images[rest]), [clinic.truths[i] for i in rest])
            inside = jaccard_table(probabilities(model, clinic.images[chosen]), [clinic.truths[i] for i in chosen])
            row = {"style": style, "variant": name, "start": table[rest, own].mean(),
                   "thr": table[rest, int(np.argmax(table[chosen].mean(0)))].mean(), "ft": scores[:, own].mean(),
                   "ft_thr_in": scores[:, int(np.argmax(inside.mean(0)))].mean(), "secs": time.perf_counter() - began}  # fmt: skip
            print(
                json.dumps({k: round(float(v), 4) if not isinstance(v, str) else v for k, v in row.items()}), flush=True
            )


if __name__ == "__main__":
    main()
