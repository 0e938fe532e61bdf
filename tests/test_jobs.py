"""The Ray Jobs API path of cluster/README.md: `ray job submit --working-dir . -- python sweeps/mini.py --smoke`
against a Ray head this test starts on 127.0.0.1 (its own ports and temp dir; the dashboard, which serves the
Jobs API, bound to loopback). Torn down by killing exactly the processes of that head: `ray stop` would stop
every Ray instance on the machine, other test sessions' included."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("aiohttp", reason="the Jobs API is served by Ray's dashboard: pip install 'ray[default]' "
                                      "(in the dev extra)")
psutil = pytest.importorskip("psutil")
ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _kill_processes_of(marker: str) -> None:
    """Terminate (then kill) every process whose command line names `marker` (this head's temp dir), and
    their descendants (dashboard modules, workers, the job's driver)."""
    roots = [p for p in psutil.process_iter(["cmdline"]) if any(marker in a for a in (p.info["cmdline"] or []))]
    procs = set(roots)
    for p in roots:
        try:
            procs.update(p.children(recursive=True))
        except psutil.Error:
            pass
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(procs), timeout=2)  # the raylet and GCS outlast any wait: killed anyway
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


@pytest.fixture(scope="module")
def job_head():
    """The Jobs API address (http://127.0.0.1:PORT) of a fresh one-node Ray head with 2 CPUs."""
    temp_dir = f"/tmp/rayjob-{os.getpid()}"  # short: unix socket paths must stay under 107 bytes
    gcs, dashboard, agent, client, metrics = _free_ports(5)
    # RAY_memory_monitor_refresh_ms=0: Ray's monitor kills tasks when the *machine* passes 95% memory, and
    # on a shared test machine other processes' memory would kill this head's trials
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_memory_monitor_refresh_ms": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    start = [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--include-dashboard", "true",
             "--dashboard-agent-listen-port", str(agent), "--ray-client-server-port", str(client),
             "--metrics-export-port", str(metrics), "--temp-dir", temp_dir, "--num-cpus", "2",
             "--object-store-memory", str(100 * 1024 * 1024), "--disable-usage-stats"]
    try:
        done = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-2000:]
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        _kill_processes_of(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_smoke_sweep(job_head, tmp_path):
    address, env = job_head
    storage = tmp_path / "storage"
    submit = [RAY, "job", "submit", "--address", address, "--working-dir", ".", "--",
              "python", "sweeps/mini.py", "--smoke", "--tasks", "count", "--epochs", "1", "--storage", str(storage)]
    done = subprocess.run(submit, cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert "succeeded" in log and "SPT (selected)" in log  # the sweep's summary, streamed back by the CLI

    from spt_ray.results import read_results

    rows = read_results(str(storage)).to_pylist()
    final = {r["label"] for r in rows if r["row_kind"] == "final" and r["status"] == "completed"}
    assert {r["task"] for r in rows} == {"count"} and final == {"best", "linear"}
