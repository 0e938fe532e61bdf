"""Entry point of the figures' fresh subprocesses: `python bench/figures/worker.py memory|sweep ARG`, printing
one JSON line (the last line of stdout)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

# Run as a script: replace this folder on the path by bench/, so `figures` imports as the package.
sys.path[0] = str(Path(__file__).resolve().parents[1])

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "memory":
        from figures.memory import memory_worker

        print(json.dumps(memory_worker(json.loads(sys.argv[2]))))
    elif len(sys.argv) == 3 and sys.argv[1] == "sweep":
        from figures.sweep import sweep_worker

        print(json.dumps(sweep_worker(sys.argv[2]), default=str))
    else:
        sys.exit("internal worker entry point; run bench/run.py")
