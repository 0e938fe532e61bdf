"""`spt-ray tune` in a subprocess with the smallest settings that still run every phase: one task, two searched
trials, two epochs, one final seed, a one-batch sensitivity pass. The fault drills (test_faults.py) and the
progress lines (test_progress.py) run it; one uninterrupted run is shared (conftest.py's `tiny_tune`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from spt_core.experiment import BackboneRef

ROOT = Path(__file__).resolve().parents[1]
TASK = "shapes"
TINY = {"num_samples": 2, "baselines": ["linear"], "final_seeds": [42], "seed": 3, "max_concurrent": 2,
        "train": {"epochs": 2, "batch_size": 32, "warmup_epochs": 0, "lr": 5e-3, "weight_decay": 1e-4},
        "sensitivity": {"num_batches": 1, "batch_size": 16}, "scheduler": {"kind": "fifo"}}


@dataclass(frozen=True)
class FinishedTune:
    """An `spt-ray tune` that ran to its end: where it wrote, under which sweep name, and what it printed."""

    storage: Path
    name: str
    returncode: int
    stdout: str
    stderr: str


def start_tune(tmp: Path, storage: Path, name: str, data_root: str, backbone: BackboneRef, address: str | None,
               tag: str, *extra: str, stderr_apart: bool = False) -> subprocess.Popen:
    """`spt-ray tune` of TINY on TASK in its own session (a process group Ctrl-C reaches as a whole); its stdout
    goes to <tmp>/<tag>.log, its stderr there too or, with stderr_apart, to <tmp>/<tag>.err."""
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    argv = [sys.executable, "-m", "spt_ray.cli", "tune", "--suite", "mini", "--tasks", TASK, "--data-root",
            data_root, "--storage", str(storage), "--name", name, "--config", str(config), *extra]
    argv += ["--address", address] if address else []
    argv += ["--weights", backbone.weights] if backbone.weights else []
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "SPT_NO_PROGRESS": "1"}
    log = open(tmp / f"{tag}.log", "w")
    err = open(tmp / f"{tag}.err", "w") if stderr_apart else subprocess.STDOUT
    return subprocess.Popen(argv, stdout=log, stderr=err, env=env, start_new_session=True, cwd=str(ROOT))


def finish(proc: subprocess.Popen, timeout: float = 300) -> int:
    """Its exit code; a sweep still running after `timeout` s is killed with its whole process group."""
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def run_tiny_tune(tmp: Path, data_root: str, backbone: BackboneRef, address: str) -> FinishedTune:
    """One uninterrupted `spt-ray tune --json` into <tmp>/storage, stdout (the JSON answer) and stderr apart."""
    name = "tiny"
    code = finish(start_tune(tmp, tmp / "storage", name, data_root, backbone, address, name, "--json",
                             stderr_apart=True), timeout=600)
    return FinishedTune(tmp / "storage", name, code, (tmp / f"{name}.log").read_text(),
                        (tmp / f"{name}.err").read_text())
