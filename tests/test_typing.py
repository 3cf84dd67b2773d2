"""qairn ships py.typed: a caller's type checker reads qairn's annotations instead of taking each call as
Any. tests/api_typing/uses_the_api.py calls the public API as README.md does; mypy must pass it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
USER_CODE = REPO / "tests" / "api_typing" / "uses_the_api.py"


def test_a_typed_caller_passes_mypy(tmp_path):
    pytest.importorskip("mypy", reason="mypy is not installed (it is in the dev extra)")
    pytest.importorskip("av", reason="PyAV is not installed: the user code types its video frames with it")
    # Run from outside the repository with qairn on PYTHONPATH, as a caller's mypy finds an installed
    # package: a package in mypy's working folder is read as source, py.typed or not (and an editable
    # install's import hook mypy does not follow at all).
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    # The cache (git-ignored) stays: numpy's and torch's stubs take most of a cold run's 25 s.
    # --warn-unreachable: a branch qairn's annotations say cannot run (`if res.image is None`) fails.
    command = [sys.executable, "-m", "mypy", "--strict", "--warn-unreachable", "--follow-imports=silent"]
    command += ["--cache-dir", str(REPO / ".mypy_cache"), str(USER_CODE)]
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        pytest.fail(run.stdout + run.stderr, pytrace=False)
