"""Sweep overhead: spt_ray's run_sweep on the mini smoke recipe, in a subprocess (needs Ray)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .common import ROOT, WORKER



def measure_sweep_overhead(*, timeout: float, log: Callable[[str], None]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="spt-bench-sweep-") as tmp:
        proc = None
        try:
            proc = subprocess.run([sys.executable, str(WORKER), "sweep", tmp],
                                  capture_output=True, text=True, timeout=timeout, cwd=str(ROOT),
                                  env={**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                                       "RAY_TMPDIR": f"/tmp/sptb{os.getpid()}"})
        except subprocess.TimeoutExpired:
            return {"share": None, "reason": f"the smoke sweep did not finish within {timeout:.0f} s"}
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return {"share": None, "reason": "spt_ray sweep engine failed: " + " | ".join(tail)[-600:]}
        res = json.loads(lines[-1])
        log(f"  sweep: wall {res['overhead']['wall_s']:.1f} s, busy {res['overhead']['busy_s']:.1f} s, "
            f"share {res['overhead']['share']:.3f}")
        return {"share": res["overhead"]["share"], **res}


def sweep_worker(tmp: str) -> dict[str, Any]:
    """Runs in a fresh process: the mini smoke recipe end to end through spt_ray.run_sweep."""
    t_start = time.perf_counter()
    from spt_core.data.mini import write_mini_suite
    from spt_core.embedded import EMBEDDED_WEIGHTS, build_embedded_vit
    from spt_ray import SweepSpec, run_sweep
    from spt_ray.suites import recipe

    rec = recipe("mini", smoke=True)
    data_root = Path(tmp) / "data"
    t0 = time.perf_counter()
    write_mini_suite(data_root, seed=0, tasks=list(rec["tasks"]))
    data_s = time.perf_counter() - t0
    backbone = dict(rec["backbone"])
    if not EMBEDDED_WEIGHTS.is_file():  # no shipped weights: the same architecture with seeded random weights
        from safetensors.torch import save_file

        torch.manual_seed(0)
        path = Path(tmp) / "spt_mini_vit_random.safetensors"
        save_file({k: v.contiguous() for k, v in build_embedded_vit(10).state_dict().items()}, str(path))
        backbone["weights"] = str(path)
    spec = SweepSpec.from_dict({**rec, "data_root": str(data_root), "storage": str(Path(tmp) / "storage"),
                                "backbone": backbone, "address": "local"})
    t0 = time.perf_counter()
    result = run_sweep(spec)
    return {"overhead": result.overhead, "trials": result.trials, "recipe": "mini smoke",
            "tasks": list(spec.tasks), "num_samples": spec.num_samples, "baselines": list(spec.baselines),
            "epochs": spec.train.epochs, "sweep_s": time.perf_counter() - t0, "data_generation_s": data_s,
            "process_s": time.perf_counter() - t_start}
