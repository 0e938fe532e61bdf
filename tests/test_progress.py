"""Live progress of a sweep: the numbers of each line against counts made by hand, the sensitivity pass
forwarding its batches, Ray's and Tune's chatter off without -v, and one real `spt-ray tune` whose stderr
is read line by line and checked against the Parquet results."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import time
from types import SimpleNamespace

import pytest

from spt_core.progress import progress_bar, progress_sink
from spt_ray.progress import (QUIET_LOGGERS, SweepProgress, clock, eta, planned_trials, sweep_output, table_lines,
                              task_counts)
from spt_ray.search import FixedSearcher

# Ray prefixes a worker's forwarded lines with "(<actor> pid=<n>)"
NOISE = ("Checkpoint successfully created", "Trial status", "pid=", "Configuration for experiment",
         "View detailed results", "Started a local Ray instance", "A new study created", "Wrote the latest version")


def trial(tid: str, task: str, status: str, phase: str | None = None, **last) -> SimpleNamespace:
    return SimpleNamespace(trial_id=tid, config={"task": task, **({"phase": phase} if phase else {})},
                           status=status, last_result=last)


TRIALS = [trial("a", "cifar", "TERMINATED", val_acc=0.5, epoch=4, epochs=4),
          trial("b", "cifar", "RUNNING", val_acc=0.7, epoch=1, epochs=4),
          trial("c", "cifar", "ERROR", val_acc=None),
          trial("d", "dtd", "PENDING"),
          trial("e", "dtd", "RUNNING", "search", val_acc=0.2, epoch=3, epochs=4),
          trial("f", "dtd", "TERMINATED", "final", val_acc=0.9, test_acc=0.4, epoch=4, epochs=4)]
PLANNED = {"search": {"cifar": 5, "dtd": 2}, "final": {"cifar": 2, "dtd": 2}}


def test_task_counts_match_a_hand_count():
    counts = task_counts(TRIALS, PLANNED)
    assert counts["search"]["cifar"] == {"done": 2, "running": 1, "planned": 5, "best": 0.7, "work": 2.25}
    assert counts["search"]["dtd"] == {"done": 0, "running": 1, "planned": 2, "best": 0.2, "work": 0.75}
    # the final phase's best is test accuracy (its val_acc of 0.9 is not what a final run is ranked by)
    assert counts["final"]["dtd"] == {"done": 1, "running": 0, "planned": 2, "best": 0.4, "work": 1.0}
    assert counts["final"]["cifar"]["done"] == 0 and counts["final"]["cifar"]["best"] is None
    # the trial an event is about counts with the event's status even before Tune marks it
    over = task_counts(TRIALS, PLANNED, override=("e", "TERMINATED"))["search"]["dtd"]
    assert over["done"] == 1 and over["running"] == 0 and over["work"] == 1.0
    # more trials than planned (a restored experiment): planned grows, never below what exists
    assert task_counts(TRIALS, {"search": {"cifar": 1}})["search"]["cifar"]["planned"] == 3


def test_eta_is_the_rate_of_this_invocation():
    assert eta(60.0, work=3.0, work_at_start=1.0, total=5.0) == pytest.approx(60.0)  # 2 units/min, 2 left
    assert eta(60.0, work=1.0, work_at_start=1.0, total=5.0) is None  # nothing done yet: unknown, not 0
    assert clock(None) == "?" and clock(65) == "1:05" and clock(3725) == "1:02:05"


def test_planned_trials_per_phase_and_task():
    spec = SimpleNamespace(tasks=("a", "b"), run_final=True, final_seeds=(1, 2), num_samples=3,
                           baselines=("linear", "lora"))
    assert planned_trials(spec, "search", 10) == {"search": {"a": 5, "b": 5}, "final": {"a": 6, "b": 6}}
    runs = [{"task": "a"}, {"task": "a"}, {"task": "b"}]
    assert planned_trials(spec, "final", 3, FixedSearcher(runs)) == {"final": {"a": 2, "b": 1}}


def test_event_lines_and_live_table(capsys):
    cb = SweepProgress(PLANNED, live=False)
    cb.setup()
    cb.on_trial_complete(0, TRIALS, TRIALS[4])
    line = capsys.readouterr().err.strip()
    assert re.match(r"\[search 0:0\d\] dtd 1/2 done, 0 running, best val_acc 20\.00% \| all 4/11, ETA \S+ \| "
                    r"finished .* val_acc 20\.00%$", line), line
    cb.on_trial_complete(0, TRIALS, TRIALS[5])
    assert "[final" in capsys.readouterr().err
    counts = task_counts(TRIALS, PLANNED)
    table = table_lines(5.0, counts, {"done": 3, "running": 2, "planned": 11}, None)
    assert table[1].split() == ["search", "cifar", "2/5", "1", "val_acc", "70.00%"]
    assert table[4].split() == ["final", "dtd", "1/2", "0", "test_acc", "40.00%"]
    assert table[-1] == "3/11 trials done, 2 running, elapsed 0:05, ETA ?"
    cb.on_trial_start(0, TRIALS, TRIALS[1])
    cb.on_trial_recover(0, TRIALS, TRIALS[1])
    cb.on_trial_start(0, TRIALS, TRIALS[1])
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].split(" | ")[-1].startswith("started ") and lines[2].split(" | ")[-1].startswith("restarted ")
    assert "cifar 2/5 done, 0 running" in lines[1] and "restarts from its last checkpoint" in lines[1]
    live = SweepProgress(PLANNED, live=True)
    live.setup()
    live.on_trial_start(0, TRIALS, TRIALS[1])
    live.on_trial_complete(0, TRIALS, TRIALS[1])
    err = capsys.readouterr().err
    assert err.count("\x1b[6F\x1b[J") == 1  # the second draw replaces the first table (header, 4 rows, total)


def test_callback_pickles_without_its_clock():
    cb = SweepProgress({"final": {"a": 2}}, default_phase="final")
    cb.setup()
    back = pickle.loads(pickle.dumps(cb))
    assert (back.planned, back.default_phase, back.start) == ({"final": {"a": 2}}, "final", None)


def test_sweep_output_quiets_and_restores():
    import optuna

    before = {n: logging.getLogger(n).level for n in QUIET_LOGGERS}
    env = os.environ.get("RAY_AIR_NEW_OUTPUT")
    with sweep_output(False):
        assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0"
        assert logging.getLogger("ray.tune").getEffectiveLevel() == logging.ERROR
        assert optuna.logging.get_verbosity() == optuna.logging.WARNING
    assert {n: logging.getLogger(n).level for n in QUIET_LOGGERS} == before
    assert os.environ.get("RAY_AIR_NEW_OUTPUT") == env
    with sweep_output(True):
        assert os.environ.get("RAY_AIR_NEW_OUTPUT") == env


def test_progress_sink_hears_every_batch_of_the_sensitivity_pass(vit):
    from conftest import random_batches
    from spt_core.sensitivity import compute_sensitivity

    heard = []
    with progress_sink(lambda desc, done, total: heard.append((desc, done, total))):
        compute_sensitivity(vit, random_batches(3), num_batches=3, progress=False)  # a disabled bar still reports
    assert heard == [("sensitivity", 1, 3), ("sensitivity", 2, 3), ("sensitivity", 3, 3)]
    with progress_bar(total=2, desc="x", unit="step", enabled=False) as bar:
        bar.update(1)  # outside a sink: a plain bar
    assert len(heard) == 3


def test_a_pass_reports_its_batches_to_the_store(ray_cluster, tmp_path, capsys, monkeypatch):
    import types

    import ray

    from spt_ray import passes
    from spt_ray.passes import pass_reporter
    from spt_ray.store import get_store, store_actor_name

    def seen_soon(expected: dict) -> dict:  # the reports are fire-and-forget calls to an async actor
        deadline = time.monotonic() + 30
        while (seen := ray.get(store.passes_running.remote())) != expected and time.monotonic() < deadline:
            time.sleep(0.05)
        return seen

    store = get_store(tmp_path, name="spt-progress-test")
    # A monotonic clock near its start, as on a machine booted a minute ago: the first report still goes out.
    monkeypatch.setattr(passes, "time", types.SimpleNamespace(monotonic=lambda: 60.0))
    report = pass_reporter(store, "k1", "shapes", every_s=3600)
    report("sensitivity", 1, 3)
    assert seen_soon({"k1": {"task": "shapes", "done": 1, "total": 3}}) == {"k1": {"task": "shapes", "done": 1,
                                                                                  "total": 3}}
    report("sensitivity", 2, 3)  # inside every_s: not sent
    report("sensitivity", 3, 3)  # the last always goes out
    report("pretrain spt-mini-vit", 9, 9)  # another bar in the same task is not the pass
    assert seen_soon({"k1": {"task": "shapes", "done": 3, "total": 3}})["k1"]["done"] == 3
    time.sleep(0.5)
    assert ray.get(store.passes_running.remote())["k1"] == {"task": "shapes", "done": 3, "total": 3}
    ray.get(store.pass_progress.remote("k1", "shapes", 2, 3))  # a late, out-of-order report
    assert ray.get(store.passes_running.remote())["k1"]["done"] == 3
    # the sweep's progress callback polls the store between Tune's steps (passes overlap the trials)
    cb = SweepProgress({"search": {"shapes": 2}}, live=False, min_redraw_s=0,
                       store=store_actor_name(tmp_path, "spt-progress-test"))
    cb.setup()
    cb.passes = {"k0": {"task": "count", "done": 1, "total": 1}}  # a pass that has ended since the last poll
    cb.on_step_begin(0, [])
    lines = capsys.readouterr().err.splitlines()
    assert [x.split("] ", 1)[1] for x in lines] == ["shapes: computing its sensitivity map",
                                                    "count: sensitivity map computed"], lines
    cb.on_step_begin(0, [])
    assert capsys.readouterr().err == ""  # nothing new: nothing printed
    live = SweepProgress({"search": {"shapes": 2}}, live=True, min_redraw_s=0,
                         store=store_actor_name(tmp_path, "spt-progress-test"))
    live.setup()
    live.on_step_begin(0, [])
    assert "map     shapes             3/3    batches" in capsys.readouterr().err
    ray.kill(store)
    cb.on_step_begin(0, [])  # the store is gone: the callback stops asking, the sweep goes on
    assert cb.store is None


# ---- end to end: `spt-ray tune` in a subprocess, stderr read line by line -----------------------------
LINE = re.compile(r"^\[(search|final) [\d:]+\] (\w+) (\d+)/(\d+) done, (\d+) running, best (\w+) (\S+) \| "
                  r"all (\d+)/(\d+), ETA \S+ \| (started|finished|error in) (\S+)")


@pytest.mark.slow
def test_tune_shows_progress_lines_and_no_ray_noise(tiny_tune):
    """The session's `spt-ray tune --json` of tests/tiny_tune.py's sweep (shapes, 2 searched trials, then the
    selected config and the linear baseline with one seed), its stderr against its Parquet rows."""
    from spt_ray.results import read_results

    proc = tiny_tune
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)  # stdout holds the answer only: progress goes to stderr
    for noise in NOISE:
        assert noise not in proc.stderr + proc.stdout, f"{noise!r} shown without -v:\n{proc.stderr[-2000:]}"
    lines = proc.stderr.splitlines()
    assert any(re.match(r"\[sensitivity [\d:]+\] shapes: map (computed|loaded).* \| 1/1 tasks$", s) for s in lines)
    events = [m.groups() for m in map(LINE.match, lines) if m]
    table = read_results(str(proc.storage), proc.name).to_pylist()
    total = 4  # 2 searched trials, then the selected config and the linear baseline with one seed
    assert int(events[-1][7]) == int(events[-1][8]) == total and events[-1][9] == "finished"
    for phase, planned, metric in (("search", 2, "val_acc"), ("final", 2, "test_acc")):
        mine = [e for e in events if e[0] == phase]
        # every trial starts once and finishes once; the counts run 1..planned
        assert sorted(e[9] for e in mine) == ["finished"] * planned + ["started"] * planned, mine
        finished = [e for e in mine if e[9] == "finished"]
        assert [int(e[2]) for e in finished] == list(range(1, planned + 1))
        assert all(int(e[3]) == planned and int(e[8]) == total and e[5] == metric for e in mine)
        last = finished[-1]
        assert int(last[4]) == 0
        # best so far == the best of the runs' last reports in Parquet (the rows the driver wrote)
        kind = "trial" if phase == "search" else "final"
        best = max(r[metric] for r in table if r["phase"] == phase and r["row_kind"] == kind)
        assert last[6] == f"{100 * best:.2f}%"
    assert f'{100 * result["best"]["shapes"]["val_acc"]:.2f}%' == [e for e in events if e[0] == "search"][-1][6]
