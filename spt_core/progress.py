"""Progress reporting for long work (tqdm on stderr, silent when disabled or not a terminal-friendly run)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from tqdm.auto import tqdm


@contextmanager
def progress_bar(*, total: int | None, desc: str, unit: str, enabled: bool = True) -> Iterator[tqdm]:
    """A tqdm bar; SPT_NO_PROGRESS=1 silences every bar (used by Ray trials and tests)."""
    disable = not enabled or os.environ.get("SPT_NO_PROGRESS") == "1"
    with tqdm(total=total, desc=desc, unit=unit, disable=disable, leave=False, dynamic_ncols=True) as bar:
        yield bar
