"""What a resumed sweep may reuse: a phase's experiment and rows only if they are what this run would build.

The final phase is a function of the completed search (each task's selected config) and of the spec
(baselines, seeds, final recipe). Before the final experiment starts, the driver records what it is
built from in `<storage>/sweeps/<name>/final.json` (the runs, the recipe, the selected trial ids and a
digest of them). On `--resume`, a final experiment without that record (made before this check
existed, e.g. from an interrupted search) or with another digest (the selection or the spec changed)
is stale: the experiment and its rows are discarded and the phase is rebuilt from the completed search.

Rows are discarded by the results writer in one commit (a reader sees the files before or after it,
never both), and the writer forgets their ids so the rebuilt runs,
which have the same row ids, are written. Before any phase runs, its rows are also cut to the trials its
experiment will continue (`restorable_trials`): a driver killed before Tune saved the experiment's state
leaves rows of trials no restored experiment holds, and a new trial must not sit next to them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from .results import ResultsWriter
from .storage import Storage

logger = logging.getLogger(__name__)

FINAL_RECORD = "final.json"


def final_digest(runs: list[dict[str, Any]], recipe: dict[str, Any]) -> str:
    """Hash of everything the final experiment is built from (run configs in order, the final recipe)."""
    text = json.dumps({"runs": runs, "recipe": recipe}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _record_path(storage: Storage, sweep: str) -> str:
    return storage.path("sweeps", sweep, FINAL_RECORD)


def read_final_record(storage: Storage, sweep: str) -> dict[str, Any] | None:
    path = _record_path(storage, sweep)
    if not storage.exists(path):
        return None
    try:
        return json.loads(storage.read_bytes(path))
    except (OSError, ValueError):
        return None  # unreadable: treated as absent (the phase is rebuilt)


def write_final_record(storage: Storage, sweep: str, runs: list[dict[str, Any]], recipe: dict[str, Any],
                       selected: dict[str, str | None]) -> str:
    """Record what the final experiment is built from; returns the digest."""
    digest = final_digest(runs, recipe)
    record = {"digest": digest, "selected_trials": selected, "recipe": recipe, "runs": runs}
    storage.write_bytes(_record_path(storage, sweep), json.dumps(record, indent=1, default=str).encode())
    return digest


def restorable_trials(storage: Storage, experiment: str) -> set[str] | None:
    """Trial ids of a Tune experiment that `Tuner.restore` would continue; None if it cannot be restored."""
    from ray.tune import ExperimentAnalysis, Tuner

    if not Tuner.can_restore(experiment):
        return None
    analysis = ExperimentAnalysis(experiment, storage_filesystem=None if storage.local else storage.fs)
    return {t.trial_id for t in analysis.trials}


def purge_rows(storage: Storage, sweep: str, phase: str, writer: ResultsWriter, *, keep: set[str] | None,
               reason: str) -> int:
    """Remove a phase's rows whose trial is not in `keep` (None: all of them); returns how many.

    The writer removes them in one commit (readers see the rows before or after, never a half state) and
    forgets their ids: rebuilt final runs have the same row ids (task/label/seed).
    """
    def marked(table: pa.Table) -> pa.Array:
        mask = pc.fill_null(pc.equal(table.column("phase"), phase), False)
        if keep is not None:
            mask = pc.and_(mask, pc.invert(pc.is_in(table.column("trial_id"), pa.array(sorted(keep), pa.string()))))
        return mask

    removed = writer.remove_rows(phase, marked)  # one commit of the sweep's files (spt_ray/result_files.py)
    if removed:
        logger.warning("sweep %r: removed %d %s-phase rows: %s", sweep, len(removed), phase, reason)
    return len(removed)


def align_final(storage: Storage, sweep: str, runs: list[dict[str, Any]], recipe: dict[str, Any],
                selected: dict[str, str | None], writer: ResultsWriter) -> None:
    """Make the final experiment the one these runs define (see the module docstring), then record them."""
    digest = final_digest(runs, recipe)
    record = read_final_record(storage, sweep)
    if record is not None and record.get("digest") == digest:
        return
    experiment = storage.path("tune", f"{sweep}-final")
    reason = ("it was not built from the completed search" if record is None
              else "the selection or the final settings changed since it was built")
    if storage.exists(experiment):
        logger.warning("sweep %r: discarding the final-phase experiment %s: %s; rebuilding it",
                       sweep, experiment, reason)
        storage.delete_dir(experiment)
    purge_rows(storage, sweep, "final", writer, keep=None, reason=f"stale final phase ({reason})")
    write_final_record(storage, sweep, runs, recipe, selected)
