"""How far the sensitivity passes are: a pass runs as a Ray task of the sensitivity store, far from the
driver's terminal, so it reports its batches to the store (`pass_reporter`, fire and forget) and the
driver polls the store (`PassBoard.passes_running`; spt_ray/progress.py draws the bars and lines).

`PassBoard` is a base class of the store actor (spt_ray/store.py): Ray exposes a base class's methods as
actor methods. `fetch_rankings` is the blocking way to get rankings with that progress shown.
"""

from __future__ import annotations

import time
from typing import Any

from spt_core.progress import ProgressSink


class PassBoard:
    """The store's record of the passes computing now (`self.passes`: key -> task, done, total)."""

    passes: dict[str, dict[str, Any]]

    def pass_progress(self, key: str, task: str, done: int, total: int | None) -> None:
        """A running pass reports its batches. An async actor may run these calls out of order: the count
        never goes back."""
        done = max(done, self.passes.get(key, {}).get("done", 0))
        self.passes[key] = {"task": task, "done": done, "total": total}

    def passes_running(self) -> dict[str, dict[str, Any]]:
        """Sensitivity passes computing now: key -> task, batches done, batches planned."""
        return {k: dict(v) for k, v in self.passes.items()}


def pass_reporter(store: Any, key: str, task: str, every_s: float = 0.5) -> ProgressSink:
    """A progress sink telling the store (fire and forget, at most every `every_s` and at the end) how many
    batches of `task`'s sensitivity pass are done; a no-op without a store."""
    last = [float("-inf")]  # the first report goes out (time.monotonic() may start near 0 after a boot)

    def report(desc: str, done: int, total: int | None) -> None:
        now = time.monotonic()
        if store is not None and desc == "sensitivity" and (now - last[0] >= every_s or done == total):
            last[0] = now
            store.pass_progress.remote(key, task, done, total)
    return report


def fetch_rankings(store: Any, requests: dict[str, Any], needs: dict[str, Any],
                   holder: str | None = None) -> dict[str, Any]:
    """Ask the store for every task's ranking at once (it runs their computations in parallel) and wait for
    all (RankingHandle by task), showing the passes; `holder` (a sweep run) keeps them cached in the store
    until it calls `store.release.remote(holder)`."""
    from .progress import wait_for_rankings  # a bar per computing pass on a terminal, a line per task

    refs = {task: store.get_ranking.remote(req, needs[task], holder) for task, req in requests.items()}
    return wait_for_rankings(store, refs)
