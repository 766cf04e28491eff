"""Where training keeps its checkpoints, readable without torch: ``sokhan status`` lists them, and it also runs
where only the torch-free runtime is installed."""

from __future__ import annotations

import re
from pathlib import Path

STEP_DIR = re.compile(r"^step_(\d{6,})$")


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:06d}"


def checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Finished checkpoints under ``root`` as (step, folder), oldest first (temporary folders are not listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(found)
