"""qairn: JPEG artifact removal with unsupervised, no-reference quality maps (QAIRN)."""

__version__ = "0.1.0"

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
    "__version__",
]
