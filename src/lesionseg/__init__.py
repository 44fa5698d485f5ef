"""lesionseg: skin-lesion segmentation in dermoscopy images with a MobileNetV2 encoder."""

__version__ = "0.2.0"


def load(model=None, tta=False):
    """The released model, or an `.onnx` file, checkpoint or run folder: `lesionseg.load().segment("lesion.jpg")`.
    `tta=True` averages each answer over flips. See `lesionseg.prediction.Segmenter`."""
    from lesionseg.prediction import load as load_model

    return load_model(model, tta)
