"""Progress reporting for long work (tqdm on stderr, silent when disabled or not a terminal-friendly run).

A bar can also be forwarded: inside `progress_sink(fn)`, every bar calls `fn(desc, done, total)` on each
update, even a disabled one. That is how a pass running where nobody watches its terminal (the sensitivity
pass, a Ray task of the sensitivity store) tells the driver how far it is.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Iterator

from tqdm.auto import tqdm

ProgressSink = Callable[[str, int, "int | None"], None]
_SINK: ContextVar[ProgressSink | None] = ContextVar("spt_progress_sink", default=None)


@contextmanager
def progress_sink(sink: ProgressSink) -> Iterator[None]:
    """For the duration (this thread / task): every progress bar also reports to `sink(desc, done, total)`."""
    token = _SINK.set(sink)
    try:
        yield
    finally:
        _SINK.reset(token)


class _Forwarding:
    """A tqdm bar whose updates also go to the sink; everything else is the bar's own."""

    def __init__(self, bar: tqdm, sink: ProgressSink, desc: str, total: int | None):
        self._bar, self._sink, self._desc, self._total, self._done = bar, sink, desc, total, 0

    def update(self, n: int = 1) -> None:
        self._bar.update(n)
        self._done += n
        self._sink(self._desc, self._done, self._total)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bar, name)


@contextmanager
def progress_bar(*, total: int | None, desc: str, unit: str, enabled: bool = True) -> Iterator[Any]:
    """A tqdm bar; SPT_NO_PROGRESS=1 silences every bar (used by Ray trials and tests); inside
    `progress_sink` its updates are forwarded too."""
    disable = not enabled or os.environ.get("SPT_NO_PROGRESS") == "1"
    with tqdm(total=total, desc=desc, unit=unit, disable=disable, leave=False, dynamic_ncols=True) as bar:
        sink = _SINK.get()
        yield bar if sink is None else _Forwarding(bar, sink, desc, total)
