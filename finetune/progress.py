"""Progress bars for the slow parts of a run (clients of a round, evaluation examples).

Shown only where someone watches: a simulation's console sets $FEDSITE_PROGRESS=1, and a bar
appears only when stderr is a terminal (never in a log file, a pipe or Ray's workers). Bars
vanish when done (`leave=False`), so the console keeps one line per round.
"""

from __future__ import annotations

import os
import sys
from typing import Any

PROGRESS_ENV = "FEDSITE_PROGRESS"


def progress_wanted() -> bool:
    return os.environ.get(PROGRESS_ENV) == "1" and sys.stderr.isatty()


def bar(total: int, desc: str, unit: str, enabled: bool | None = None) -> Any:
    """A tqdm bar (a disabled one, which costs nothing, unless `enabled` or `progress_wanted()`)."""
    from tqdm import tqdm

    on = progress_wanted() if enabled is None else enabled
    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=not on, file=sys.stderr, dynamic_ncols=True)
