"""lesionseg: skin-lesion segmentation in dermoscopy images with a MobileNetV2 encoder.

`lesionseg.segment` segments, reviews and serves without PyTorch; `lesionseg.train` trains, evaluates, exports
and adapts with it; the command line (`cli`, `commands`), `lesionseg.load()` (`api`) and the shared ground (errors,
files, images, machine) stay here.
"""

from lesionseg.api import load
from lesionseg.version import __version__

__all__ = ["load", "__version__"]
