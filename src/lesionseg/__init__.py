"""lesionseg: skin-lesion segmentation in dermoscopy images with a MobileNetV2 encoder."""

__version__ = "0.2.0"
