"""Progress bars on stderr that a log can hold: redrawn in place on a terminal, elsewhere a plain line
now and then (restore, score, eval, eval-quality, video, train)."""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

# A bar written to a file or pipe: a line this often, the first after as long, instead of a redraw
# every 0.1 s. A run shorter than that writes no bar line at all (tqdm's delay= skips the closing one
# too): the commands' own closing lines say what was done.
LOG_EVERY_S = 30


# -q/--quiet, the same on every command: scripts that run one thousands of times want errors alone on
# stderr. Each command reads its own parsed flag (no module-level switch: tests and library callers run
# main() many times in one process, and a quiet run must not silence the next).
QUIET_HELP = (
    "no progress bars and no closing line; errors, warnings and the results themselves (tables, "
    "--json on stdout) still print"
)


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help=QUIET_HELP)


class LogLines:
    """Where a progress bar writes when stderr is not a terminal (`2> log.txt`, CI): each redraw on
    a line of its own. tqdm goes back with '\r' (and up with ESC[A for the tile bar), which a log
    keeps: a whole run was one enormous line."""

    def __init__(self, f):
        self.f = f

    def write(self, s: str) -> None:
        line = s.replace("\x1b[A", "").strip("\r\n ")  # a blank is tqdm clearing its line
        if line:
            self.f.write(line + "\n")

    def flush(self) -> None:
        self.f.flush()


def progress_bar(iterable=None, **kwargs) -> tqdm:
    """tqdm on stderr: redrawn in place on a terminal, elsewhere a line every LOG_EVERY_S seconds."""
    if sys.stderr.isatty():
        return tqdm(iterable, file=sys.stderr, **kwargs)
    return tqdm(iterable, file=LogLines(sys.stderr), mininterval=LOG_EVERY_S, delay=LOG_EVERY_S, **kwargs)
