"""Checkpoints: written atomically, read with `weights_only=True` (a file can never run code), and the model
rebuilt from the config stored inside, so neither evaluate nor predict nor export needs architecture flags."""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lesionseg.errors import CheckpointError, LesionsegError
from lesionseg.files import bounded, write_atomically
from lesionseg.train.config import ConfigError, TrainConfig
from lesionseg.train.models import build_model
from lesionseg.train.rundir import checkpoint_path

MAX_CHECKPOINT_BYTES = 2**30  # the release U-Net with its optimizer state: ~0.15 GB


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain types, so the checkpoint loads with weights_only=True."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
    }


def set_rng_state(saved: dict[str, Any]) -> None:
    kind, keys, pos, has_gauss, gauss = saved["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys  # an ndarray in checkpoints before 0.2
    np.random.set_state((kind, keys.astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(saved["torch"])
    random.setstate(saved["python"])


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Temp file in the same folder, then rename: a crash or full disk never leaves a half file."""
    try:
        write_atomically(path, lambda handle: torch.save(state, handle), "checkpoint")
    except LesionsegError as exc:
        raise CheckpointError(str(exc)) from None


def legacy_safe_globals() -> list:
    """What checkpoints of lesionseg <= 0.1 hold beyond tensors: numpy's RNG state, a plain uint32 array.
    Rebuilding an array from its bytes runs no code, so these exact types may be unpickled."""
    from numpy._core.multiarray import _reconstruct  # numpy >= 2, which wrote those checkpoints

    return [_reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]


def declared_bytes(path: Path) -> int:
    """What the checkpoint's zip says its members hold, read before anything is inflated; a file that is no
    zip (the legacy format) counts as its own size."""
    try:
        with zipfile.ZipFile(path) as archive:
            return sum(member.file_size for member in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return path.stat().st_size


def trial_load(path: Path) -> str | None:
    torch.load(path, map_location="cpu", weights_only=True)
    return None


def read_bounded(path: Path) -> None:
    """Refuse a checkpoint that would take more memory than it declares: one whose members claim more than
    MAX_CHECKPOINT_BYTES, or whose tensors ask for more than its members hold (tried once in a bounded child)."""
    size = declared_bytes(path)
    if size > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(
            f"{path}: declares {size / 2**30:.1f} GiB of contents, over the {MAX_CHECKPOINT_BYTES / 2**30:.0f} GiB "
            "a lesionseg checkpoint can hold"
        )
    with torch.serialization.safe_globals(legacy_safe_globals()):
        problem = bounded(lambda: trial_load(path), size + 2**30)
    if problem and "memory" in problem:
        raise CheckpointError(f"{path}: refused: its tensors {problem}, far more than the file declares")


def load_checkpoint(source: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint (or a run folder's best.pt) read with `weights_only=True`: tensors and plain data only,
    inside a memory bound."""
    path = checkpoint_path(source)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    read_bounded(path)
    try:
        with torch.serialization.safe_globals(legacy_safe_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: refused: it holds Python objects other than tensors and plain data "
            f"({', '.join(unsafe_globals(path)) or 'unknown types'}), which could run code when "
            "loaded; load it only if you trust it, and save its state_dicts again"
        ) from None
    except Exception as exc:  # a truncated or foreign file fails in many ways inside torch
        raise CheckpointError(f"{path}: not a readable lesionseg checkpoint ({exc.__class__.__name__})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path}: not a lesionseg checkpoint (no model/config inside)")
    return state


def unsafe_globals(path: Path) -> list[str]:
    """The types a pickle would import, read without running it (for the error message)."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)[:3]
    except Exception:  # the message still names the file without them
        return []


def stored_config(state: dict[str, Any], path: str | os.PathLike = "checkpoint") -> TrainConfig:
    try:
        return TrainConfig.from_dict(state["config"])
    except ConfigError as exc:
        raise CheckpointError(f"{path}: its stored config is not valid ({exc})") from None


def model_from_checkpoint(
    state: dict[str, Any], path: str | os.PathLike = "checkpoint"
) -> tuple[nn.Module, TrainConfig]:
    """Rebuild the model from the config stored in the checkpoint: no architecture flags needed."""
    config = stored_config(state, path)
    model = build_model(
        config.arch,
        None,
        config.freeze_encoder,
        config.dropout,
        config.decoder_attention,
        colour_constancy=config.colour_constancy,
    )
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise CheckpointError(f"{path}: its weights do not fit its config ({first[:200]})") from None
    return model.eval(), config


def load_model(source: str | os.PathLike) -> tuple[nn.Module, TrainConfig, dict[str, Any]]:
    """The model, its config and the whole checkpoint, from a .pt file or a run folder."""
    state = load_checkpoint(source)
    model, config = model_from_checkpoint(state, checkpoint_path(source))
    return model, config, state
