"""Setting aside what a run directory holds from after the step a run starts from.

A run that starts from step S (0 with ``resume=never``, an older checkpoint with ``resume=PATH``)
abandons every checkpoint and sample grid of a later step in its directory. Left in place they
would win: checkpoints are ordered by step, so pruning kept the abandoned run's higher-numbered
checkpoints and deleted the new run's own as soon as it wrote them, and the judge, ``sample``
and the next ``resume=auto`` read the abandoned weights. They move, untouched, to
``RUN/abandoned-<UTC time>/`` (nothing is deleted), as metrics.jsonl's later records move to
metrics.discarded.jsonl.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

from trainers.runtime.checkpoint import BEST, BEST_RECORD, atomic_write, complete_checkpoints

_STEP = re.compile(r"-(\d{7})(?:\.partial)?$")


def _step_of(path: Path) -> int | None:
    if path.name == BEST:
        record = path / BEST_RECORD
        return json.loads(record.read_text()).get("step") if record.is_file() else None
    match = _STEP.search(path.stem if path.suffix == ".png" else path.name)
    return int(match.group(1)) if match else None


def set_aside_after(run_dir: Path, start_step: int) -> tuple[Path, int] | None:
    """Move the checkpoints (``checkpoints/step-*``, ``checkpoints/best``) and sample grids
    (``samples/*-STEP.png``) of steps after ``start_step`` to ``run_dir/abandoned-<UTC time>/``,
    keeping their relative paths, and point ``checkpoints/latest`` at what remains. Returns the
    folder and how many entries moved, or None when nothing was later. Rank 0 only."""
    later = [p for folder in ("checkpoints", "samples") if (run_dir / folder).is_dir()
             for p in sorted((run_dir / folder).iterdir())
             if (step := _step_of(p)) is not None and step > start_step]
    if not later:
        return None
    target = run_dir / time.strftime("abandoned-%Y%m%d-%H%M%S", time.gmtime())
    for path in later:
        dest = target / path.relative_to(run_dir)
        dest.parent.mkdir(parents=True, exist_ok=True)
        path.rename(dest)
    pointer = run_dir / "checkpoints" / "latest"
    remaining = complete_checkpoints(run_dir / "checkpoints")
    if remaining:
        atomic_write(pointer, remaining[-1].name)
    else:
        pointer.unlink(missing_ok=True)
    return target, len(later)
