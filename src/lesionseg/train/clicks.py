"""`lesionseg train-clicks`: the click model, trained on our own data by iterative click simulation.

The released U-Net (rebuilt from its ONNX file, `adapt/unfold.py`) gets three more input channels through a
convolution beside its first one, initialised to zero, so training starts from exactly the released model and
learns what clicks mean. Each step simulates an annotator as RITM does ("Reviving Iterative Training with Mask
Guidance", Sofiiuk et al. 2022): half the batch starts from the released model's own mask (half of those with its
outline moved in or out, as another clinic's annotators would draw it; from step 1,900 of the first run on), half
from nothing (and a first positive click inside the lesion); then up to MAX_SIMULATED rounds, without gradients,
where the model answers and the next click goes where its answer is most wrong (`segment/clicks.next_click`); the
last answer is trained. A run saves its whole state every SAVE_EVERY steps and `--resume` continues it exactly where it stopped,
so training can be carried across sessions; at the end it exports RUN/clicks.onnx.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lesionseg.errors import LesionsegError
from lesionseg.files import output_folder, shown, write_atomically
from lesionseg.segment.clicks import GUIDE_CHANNELS, click_maps, next_click
from lesionseg.segment.predictors import released_model
from lesionseg.train.adapt.finetune import frozen_batchnorm
from lesionseg.train.augmentation import normalize
from lesionseg.train.checkpoint import load_checkpoint, save_checkpoint
from lesionseg.train.config import parse_loss
from lesionseg.train.losses import WeightedSum
from lesionseg.train.precision import bf16_is_native

STATE = "clicks.pt"
EXPORTED = "clicks.onnx"
LOG = "log.jsonl"
SAVE_EVERY = 50
MAX_SIMULATED = 3  # click rounds without gradient before the trained one (RITM: up to 3 at this size)
MOVED = 0.5  # share of the release starts whose outline is moved: its own masks of its training images are nearly right
MOVE = 0.3  # by up to this share of the radius, in or out: how far another clinic's outlines may differ from ours
RATES = {"guide": 1e-3, "decoder": 1e-4, "encoder": 3e-5}  # the new channels learn fast; what shipped, gently


class ClickNet(nn.Module):
    """The released model with a guide convolution (clicks + previous mask) added to its first convolution."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        first = base.encoder.backbone.features[0][0]
        self.guide = nn.Conv2d(GUIDE_CHANNELS, first.out_channels, 3, first.stride, 1, bias=False)
        nn.init.zeros_(self.guide.weight)

    def forward(self, image: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        """(B,3,S,S) normalized image, (B,3,S,S) guide -> (B,1,S,S) logits."""
        backbone, encoder = self.base.encoder.backbone, self.base.encoder
        stem = backbone.features[0]
        x = stem[2](stem[1](stem[0](image) + self.guide(guide)))
        features = []
        for index in range(1, len(backbone.features)):
            x = backbone.features[index](x)
            if index in encoder.stage_ends:
                features.append(x)
        return self.base.decoder(features)


class ClickExport(nn.Module):
    """RGB in [0,1] and the guide -> probability: the ONNX file's graph."""

    def __init__(self, net: ClickNet) -> None:
        super().__init__()
        self.net = net
        from lesionseg.train.models import IMAGENET_MEAN, IMAGENET_STD

        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net((image - self.mean) / self.std, guide))


def start_net() -> tuple[ClickNet, object]:
    from lesionseg.train.adapt.unfold import model_from_onnx

    base, config, _ = model_from_onnx(released_model())
    return ClickNet(base), config


def groups(net: ClickNet) -> list[dict]:
    named = {"guide": [], "decoder": [], "encoder": []}
    for name, p in net.named_parameters():
        named["guide" if name.startswith("guide") else "encoder" if ".encoder." in f".{name}" else "decoder"].append(p)
    return [{"params": params, "lr": RATES[key], "name": key} for key, params in named.items()]


def first_click(truth: np.ndarray, rng: np.random.Generator) -> tuple[int, int] | None:
    """A positive click somewhere well inside the lesion (not always its centre: annotators vary)."""
    from scipy import ndimage

    if not truth.any():
        return None
    depth = ndimage.distance_transform_edt(np.pad(truth, 1))[1:-1, 1:-1]
    rows, cols = np.nonzero(depth >= 0.5 * depth.max())
    pick = rng.integers(len(rows))
    return int(cols[pick]), int(rows[pick])


def moved(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The mask's outline moved evenly in or out by up to MOVE of its equivalent radius: the error a start mask
    has on another clinic's images (a larger or tighter outline everywhere), which one click must undo."""
    from scipy import ndimage

    if not mask.any():
        return mask
    reach = rng.uniform(-MOVE, MOVE) * np.sqrt(mask.sum() / np.pi)
    if reach >= 0:
        return mask | (ndimage.distance_transform_edt(~mask) <= reach)
    return ndimage.distance_transform_edt(mask) > -reach


def guides(clicks: list[tuple[list, list]], previous: np.ndarray, size: int) -> torch.Tensor:
    """(B,3,S,S): each sample's click disks and previous mask (clicks given at the model's size)."""
    out = np.empty((len(clicks), GUIDE_CHANNELS, size, size), np.float32)
    for n, (positive, negative) in enumerate(clicks):
        out[n, :2] = click_maps(positive, negative, size, size, size)
        out[n, 2] = previous[n]
    return torch.from_numpy(out)


def simulated_batch(net: ClickNet, images: torch.Tensor, truths: np.ndarray, starts: np.ndarray, rng) -> torch.Tensor:
    """The guide of the trained round: release or empty start, then 0..MAX_SIMULATED answered clicks."""
    size = images.shape[-1]
    from_release = rng.random(len(images)) < 0.5
    previous = np.where(from_release[:, None, None], starts, False)
    for n in np.flatnonzero(from_release & (rng.random(len(images)) < MOVED)):
        previous[n] = moved(previous[n], rng)
    clicks: list[tuple[list, list]] = []
    for n in range(len(images)):
        click = None if from_release[n] else first_click(truths[n], rng)
        clicks.append(([click] if click else [], []))
        if from_release[n] and (found := next_click(previous[n], truths[n])):
            clicks[n][0 if found[1] else 1].append(found[0])
    rounds = int(rng.integers(0, MAX_SIMULATED + 1))
    x = normalize(images)
    for _ in range(rounds):
        with torch.no_grad():
            answer = (torch.sigmoid(net(x, guides(clicks, previous, size)))[:, 0] >= 0.5).numpy()
        for n in range(len(images)):
            if found := next_click(answer[n], truths[n]):
                clicks[n][0 if found[1] else 1].append(found[0])
        previous = answer
    return guides(clicks, previous, size)


def release_masks(net: ClickNet, images: torch.Tensor) -> np.ndarray:
    """The released model's own masks of the training images (the guide all zero is the released model)."""
    out = []
    empty = torch.zeros(1, GUIDE_CHANNELS, images.shape[-1], images.shape[-1])
    with torch.no_grad():
        for at in range(0, len(images), 64):
            batch = images[at : at + 64]
            out.append(
                (torch.sigmoid(net(normalize(batch), empty.expand(len(batch), -1, -1, -1)))[:, 0] >= 0.5).numpy()
            )
    return np.concatenate(out)


def training_data(data: list[str], size: int, cache_dir: str | None):
    from lesionseg.train.data import join_splits, load_split

    splits = [load_split(folder, "train", size, cache_dir, quiet=True) for folder in data]
    return join_splits(splits[0], splits[1:], data)


def rate_at(step: int, steps: int) -> float:
    """Cosine decay from the base rates to a tenth of them."""
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step / max(steps, 1), 1.0)))


def run_train_clicks(
    data: list[str],
    out: str | Path,
    steps: int = 3000,
    batch_size: int = 16,
    resume: bool = False,
    seed: int = 0,
    cache_dir: str | None = None,
    progress=None,
) -> Path:
    """Train (or continue) the click model in OUT; export OUT/clicks.onnx when `steps` are done."""
    out = output_folder(out)
    net, config = start_net()
    state_path = out / STATE
    if state_path.exists() and not resume:
        raise LesionsegError(f"{shown(state_path)}: a click model is training here; --resume continues it")
    split = training_data(data, config.image_size, cache_dir)
    optimizer = torch.optim.AdamW(groups(net), weight_decay=1e-4)
    step, rng = 0, np.random.default_rng(seed)
    if resume and state_path.exists():
        state = load_checkpoint(state_path)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        rng.bit_generator.state = json.loads(state["rng"])
    starts_path = out / "release-masks.npy"
    if starts_path.exists():
        starts = np.load(starts_path)
    else:
        starts = release_masks(net, split.images)
        np.save(starts_path, starts)
    truths = split.masks[:, 0].numpy().astype(bool)
    loss_fn = WeightedSum(parse_loss("bce+dice"))
    fast = bf16_is_native()
    began = time.perf_counter()
    while step < steps:
        chosen = rng.choice(len(truths), batch_size, replace=False)
        turns, flip = int(rng.integers(4)), bool(rng.random() < 0.5)
        images = torch.rot90(split.images[chosen], turns, (2, 3))
        truth = np.rot90(truths[chosen], turns, (1, 2))
        start = np.rot90(starts[chosen], turns, (1, 2))
        if flip:
            images, truth, start = images.flip(3), truth[..., ::-1], start[..., ::-1]
        truth, start = np.ascontiguousarray(truth), np.ascontiguousarray(start)
        net.eval()
        guide = simulated_batch(net, images, truth, start, rng)
        frozen_batchnorm(net)
        for group in optimizer.param_groups:
            group["lr"] = RATES[group["name"]] * rate_at(step, steps)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast):
            logits = net(normalize(images), guide)
        loss = loss_fn(logits.float(), torch.from_numpy(truth[:, None].astype(np.float32)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        with open(out / LOG, "a") as log:
            log.write(
                json.dumps({"step": step, "loss": float(loss.detach()), "seconds": time.perf_counter() - began}) + "\n"
            )
        if step % SAVE_EVERY == 0 or step == steps:
            state = {
                "model": net.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": step,
                "rng": json.dumps(rng.bit_generator.state),
                "data": data,
                "config": config.to_dict(),  # the released model's config: what the click model's base is
            }
            save_checkpoint(state, state_path)
            if progress:
                progress(f"step {step} of {steps}, loss {float(loss.detach()):.3f}")
    return export_clicks(net, config, out / EXPORTED, step)


def export_clicks(net: ClickNet, config, path: Path, step: int) -> Path:
    """One ONNX file: image (N,3,S,S) RGB in [0,1] and guide (N,3,S,S) -> probability (N,1,S,S)."""
    import onnx

    from lesionseg.train.export import store_weights_fp16
    from lesionseg.version import __version__

    size = config.image_size
    example = (torch.rand(1, 3, size, size), torch.zeros(1, GUIDE_CHANNELS, size, size))
    program = torch.onnx.export(
        ClickExport(net.eval()).eval(),
        example,
        dynamo=True,
        external_data=False,
        verbose=False,
        input_names=["image", "guide"],
        output_names=["probability"],
    )
    proto = program.model_proto
    store_weights_fp16(proto)
    onnx.helper.set_model_props(
        proto,
        {
            "kind": "clicks",
            "image_size": str(size),
            "threshold": "0.5",
            "name": f"lesionseg clicks (U-Net v3 + guide, {size} px)",
            "version": f"step {step}, lesionseg {__version__}",
            "io": "image: (N,3,S,S) float32 RGB in [0,1]; guide: (N,3,S,S) positive disks, negative disks, previous "
            "mask; probability: (N,1,S,S)",
        },
    )
    return write_atomically(path, lambda handle: handle.write(proto.SerializeToString()), "ONNX model")


def export_saved(out: str | Path) -> Path:
    """OUT/clicks.onnx from the state a (running or stopped) training saved last."""
    out = Path(out)
    if not (out / STATE).is_file():
        raise LesionsegError(f"{shown(out / STATE)}: no click model training saved here")
    net, config = start_net()
    state = load_checkpoint(out / STATE)
    net.load_state_dict(state["model"])
    return export_clicks(net, config, out / EXPORTED, int(state["step"]))
