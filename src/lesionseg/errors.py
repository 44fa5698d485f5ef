"""Errors the command line reports as one line, without a traceback."""

from importlib.util import find_spec


class LesionsegError(Exception):
    """Base class: a problem the user can fix (bad input, missing file, bad option)."""


class DataError(LesionsegError):
    """An image, mask or data folder that cannot be used; the message names the file."""


class ImageTooLargeError(DataError):
    """An image whose header claims more pixels than any dermoscopy image has (a decompression bomb)."""


class NotAnImageError(DataError):
    """A file in no image format Pillow knows."""


class WeightsError(LesionsegError):
    """Pretrained weights that cannot be had; the message says how to provide them."""


class CheckpointError(LesionsegError):
    """A checkpoint that cannot be read or written; the message names the file."""


class TrainingError(LesionsegError):
    """A run that cannot go on (its loss diverged); what it saved before is intact."""


class Interrupted(LesionsegError):
    """Training stopped by Ctrl-C after the last checkpoint was saved."""


TRAIN_EXTRA = "pip install 'lesionseg[train]'"


def require_torch(what: str) -> None:
    """A one-line error, not an ImportError, where a light install lacks PyTorch."""
    if find_spec("torch") is None:
        raise LesionsegError(f"{what} needs PyTorch, which this installation lacks: {TRAIN_EXTRA}")
