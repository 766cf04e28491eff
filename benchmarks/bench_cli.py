"""What the benchmark scripts share on the command line: counts that must be positive, and errors in one line.

The scripts run as ``.venv/bin/python benchmarks/<name>.py``, which puts this folder first on ``sys.path``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from sokhan import SokhanError


def positive(text: str) -> int:
    """An argparse type: an integer ≥ 1 (a count of steps, repeats, threads or tokens)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def run(main: Callable[[], None]) -> None:
    """``main()``; a SokhanError or a file that cannot be read ends the script in one line (exit 2), not a traceback."""
    try:
        main()
    except (SokhanError, OSError) as e:
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
