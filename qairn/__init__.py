"""qairn: JPEG artifact removal with unsupervised, no-reference quality maps (QAIRN)."""

__version__ = "0.1.0"

from typing import TYPE_CHECKING  # noqa: E402

from qairn.engine.backends import BackendError  # noqa: E402
from qairn.engine.color import ColorError  # noqa: E402
from qairn.engine.restorer import Restorer, Result  # noqa: E402
from qairn.model import PRESETS, QAIRN, QAIRNConfig, minkowski, preset  # noqa: E402
from qairn.weights_io import WeightsError, load_model, save_weights  # noqa: E402

__all__ = [
    "Restorer",
    "Result",
    "QAIRN",
    "QAIRNConfig",
    "PRESETS",
    "preset",
    "minkowski",
    "load_model",
    "save_weights",
    "WeightsError",
    "BackendError",
    "ColorError",
    "ImageError",
    "VideoError",
    "__version__",
]

# The errors a caller catches, under one name each. The image and video ones live in modules that import
# Pillow/OpenCV and PyAV helpers: loaded when first asked for, so `import qairn` stays light.
_LAZY = {"ImageError": "qairn.engine.imageio", "VideoError": "qairn.engine.video"}

if TYPE_CHECKING:
    # What type checkers read instead of __getattr__, which would make every name, a misspelt one too, Any.
    from qairn.engine.imageio import ImageError
    from qairn.engine.video import VideoError
else:

    def __getattr__(name: str) -> object:
        if name in _LAZY:
            import importlib

            return getattr(importlib.import_module(_LAZY[name]), name)
        raise AttributeError(f"module 'qairn' has no attribute {name!r}")
