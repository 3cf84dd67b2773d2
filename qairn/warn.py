"""warn(): a UserWarning that names the caller's line outside qairn, however deep qairn's own calls go.

A fixed stacklevel named a line inside qairn whenever the same warning was reached by a path of
another depth (Restorer(...) -> backends.make -> OrtBackend -> the warning: backends.py:184). Python
3.12's warnings.warn(skip_file_prefixes=...) does this; 3.11 has no such option, so the frames are
walked here.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

# Not resolved: compared with code objects' file names, which take the form the import found.
QAIRN_DIR = str(Path(__file__).parent) + os.sep


def user_stacklevel() -> int:
    """warnings.warn's stacklevel, for its caller, that names the first frame outside qairn."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(QAIRN_DIR):
        level, frame = level + 1, frame.f_back
    return level


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    warnings.warn(message, category, stacklevel=user_stacklevel())
