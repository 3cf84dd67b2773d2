"""`python -m qairn ...` runs the `qairn` command (for an environment whose scripts folder is not on
PATH, or to pick the interpreter explicitly)."""

from qairn.cli import main

raise SystemExit(main())
