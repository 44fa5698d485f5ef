"""lesionseg: skin-lesion segmentation in dermoscopy images with a MobileNetV2 encoder."""

__version__ = "0.3.0"  # the one place the version is written; pyproject.toml reads it from here


def load(model=None, tta=False, largest_component=False, fill_holes=False):
    """The released model, or an `.onnx` file, checkpoint or run folder: `lesionseg.load().segment("lesion.jpg")`.
    `tta=True` averages each answer over flips; `largest_component` and `fill_holes` refine each mask.
    See `lesionseg.api.Segmenter`."""
    from lesionseg.api import load as load_model

    return load_model(model, tta, largest_component, fill_holes)
