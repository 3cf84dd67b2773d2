"""What qairn says to its user, said one way everywhere.

warn(): a UserWarning that names the caller's line outside qairn, however deep qairn's own calls go.
A fixed stacklevel named a line inside qairn whenever the same warning was reached by a path of another
depth (Restorer(...) -> backends.make_backend -> OrtBackend -> the warning: a line of backends.py).
Python 3.12's warnings.warn(skip_file_prefixes=...) does this; 3.11 has no such option, so the frames
are walked here.

counted(): '1 image', '2 images': a count with its noun, singular for one ("1 images" was said).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

# Not resolved: compared with code objects' file names, which take the form the import found.
QAIRN_DIR = str(Path(__file__).parent) + os.sep


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    # stacklevel 1 is this frame; each frame inside qairn adds one, up to the first outside it.
    level, frame = 1, sys._getframe(0)
    while frame is not None and frame.f_code.co_filename.startswith(QAIRN_DIR):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, category, stacklevel=level)


def counted(n: int, noun: str) -> str:
    """'1 frame', '2 damaged frames': n with its noun (its last word made plural), singular for one."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
