"""The `qairn` command line: one subcommand per job, each implemented where its code lives."""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading

# subcommand -> (module, function taking argv); imported lazily so `qairn score` stays quick.
COMMANDS = {
    "restore": ("qairn.engine.cli", "main_restore"),
    "score": ("qairn.engine.cli", "main_score"),
    "train": ("qairn.train.trainer", "main"),
    "eval": ("qairn.train.evaluate", "main_eval"),
    "eval-quality": ("qairn.train.evaluate", "main_quality"),
    "export": ("qairn.export.cli", "main"),
    "bench": ("qairn.engine.bench", "main"),
    "video": ("qairn.engine.video", "main"),
}

USAGE = "usage: qairn {" + ",".join(COMMANDS) + "} ...   (qairn COMMAND -h for help)"

# `qairn -h`: what each command is for (the usage line alone named them and no more).
SUMMARIES = {
    "restore": "remove JPEG artifacts from images",
    "score": "no-reference quality Q1..Q3 of images",
    "train": "train a network (CPU, one GPU or DDP through torchrun)",
    "eval": "JPEG restoration metrics on LIVE1 (paper Table I)",
    "eval-quality": "Q1..Q3 against generated distortions; --sweep-p chooses p",
    "export": "ONNX file or TensorRT engine from a weights file",
    "bench": "speed of each backend, and how close it stays to eager fp32",
    "video": "restore a video file (or --score-only), with a per-frame quality trace",
}
HELP = USAGE + "\n\ncommands:\n" + "".join(f"  {name:<13} {SUMMARIES[name]}\n" for name in COMMANDS)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # a usage error: on stderr, as an unknown command's
        print(USAGE, file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(HELP, end="")
        return 0
    if argv[0] in ("-V", "--version"):
        from qairn import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"qairn: unknown command {name!r}{command_hint(name)}\n{USAGE}", file=sys.stderr)
        return 2
    module, func = COMMANDS[name]
    # SIGTERM (kill, a container stopping) ends a run as Ctrl-C does: the half-written temp file is
    # removed on the way out instead of left behind. Commands with their own handler (train's
    # checkpoint on signal, video) install it over this one for their run.
    main_thread = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        rc = getattr(importlib.import_module(module), func)(rest)
    except BrokenPipeError:  # `qairn score ... | head`: the reader left; quiet, as cat is (before OSError)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush would fail again
        return 141
    except (OSError, ValueError) as e:  # WeightsError is a ValueError
        # A missing folder, an unreadable file, a file that is not our weights, options that do not
        # fit together (an overlap as wide as the tile): the user's to fix, so one line that names
        # it. QAIRN_DEBUG=1 shows the traceback; other exceptions always do.
        if os.environ.get("QAIRN_DEBUG") == "1":
            raise
        print(f"qairn {name}: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # train's non-finite loss or weights: the run's fault, not a usage error
        if os.environ.get("QAIRN_DEBUG") == "1":
            raise
        print(f"qairn {name}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback (outputs are renamed in only when whole)
        if os.environ.get("QAIRN_DEBUG") == "1":
            raise
        print(f"qairn {name}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # raise SystemExit("message"): the same one line; argparse's exits pass
        if not isinstance(e.code, str):
            raise
        print(f"qairn {name}: error: {e.code}", file=sys.stderr)
        return 2
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, old_term)
    return int(rc or 0)


def command_hint(name: str) -> str:
    """What an unknown command probably meant: a typo of one (resotre), or the input given first."""
    import difflib

    close = difflib.get_close_matches(name, COMMANDS, n=1)
    if close:
        return f" (did you mean {close[0]}?)"
    if os.path.isfile(name):
        return f" (a file: the command comes first, e.g. qairn restore {name} -o OUT)"
    return ""


def _terminate(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
