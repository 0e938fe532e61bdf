"""Checks a sweep passes before it writes anything that makes it a sweep (`sweeps/<name>/spec.json`).

Why before: once spec.json exists, the same command without `--resume` is refused ("already exists"),
so a sweep that failed on a typo in its data path would block its own rerun. Every check here only
reads: the storage (is it a folder, can this user write there), every split of every task the sweep
will read (folder, list file, labels, images present; decoding is left to the loaders), the backbone
(built and loaded once: unreadable or mismatched weights fail here), the search space against that
backbone (a budget above the model) and, once Ray is up, the trial and sensitivity resources against
the cluster's nodes. Each failure is a ValueError whose one line names the problem and the fix.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

from spt_core.experiment import PHASE_SPLITS, TaskRef, load_backbone
from spt_core.layout import ModelLayout

from .spec import SweepSpec
from .storage import is_uri

logger = logging.getLogger(__name__)


def check_storage(location: str) -> None:
    """A local storage must be a folder this user can create or write to (tested by creating and removing
    an empty folder in it, or in its nearest existing parent: nothing is left behind)."""
    if is_uri(location):
        return  # object stores: permissions show on the first write (the sensitivity map)
    path = Path(location)
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        what = "is a file" if probe == path else f"is under {probe}, which is a file"
        raise ValueError(f"--storage {path} {what}, not a folder; pass a folder (created if missing), "
                         f"e.g. --storage {path.parent / (path.name + '-runs')}")
    try:  # what the sweep will do first: create a folder there (os.access is wrong for root on procfs/sysfs)
        os.rmdir(tempfile.mkdtemp(prefix=".spt-write-check-", dir=probe))
    except OSError as err:
        where = "" if probe == path else f" (nor is its nearest existing parent {probe})"
        raise ValueError(f"--storage {path} is not writable{where}: {err.strerror}; pass a folder you can "
                         "write to") from None


def _splits(spec: SweepSpec, task: TaskRef) -> list[str]:
    table = PHASE_SPLITS["fgvc" if spec.suite == "fgvc" else "vtab"]
    splits = [spec.sensitivity.split or task.sensitivity_split, *table["search"]]
    if spec.run_final:
        splits += table["final"]
    return list(dict.fromkeys(splits))


def check_data(spec: SweepSpec) -> None:
    """Every split the sweep reads, for every task: folders, list files, labels and listed images exist."""
    from spt_core.data.fgvc import FgvcDataset
    from spt_core.data.vtab import VtabDataset

    for name in spec.tasks:
        task = TaskRef(spec.suite, name, spec.data_root, spec.img_size)
        for split in _splits(spec, task):
            if spec.suite == "fgvc":
                FgvcDataset(spec.data_root, name, split, img_size=task.size, train=False)
            else:
                VtabDataset(spec.data_root, name, split, img_size=task.size)


def check_backbone(spec: SweepSpec) -> int:
    """Build the backbone with its weights (as every trial will) and check the search space fits it.

    Returns the backbone's parameter count without the head (what fractional budgets refer to).
    """
    task = TaskRef(spec.suite, spec.tasks[0], spec.data_root, spec.img_size)
    model, _ = load_backbone(spec.backbone, task, seed=0)
    total = ModelLayout.from_model(model).total_params
    try:
        spec.space.resolve(total)
    except ValueError as err:
        raise ValueError(f"search space: {err}; lower `space.budget` in --config (budget_unit "
                         f"{spec.space.budget_unit!r})") from None
    return total


def check_sweep(spec: SweepSpec) -> None:
    """Everything that needs no cluster; see the module docstring."""
    check_storage(spec.storage)
    check_data(spec)
    check_backbone(spec)


def _fits(need: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(k, 0.0) + 1e-9 >= v for k, v in need.items() if v > 0)


def dead_recorded_cluster(temp_dir: str | None = None) -> str | None:
    """The address an earlier `ray start` on this machine recorded, when nothing answers there any more.

    `ray.init()` without an address attaches to that record (Ray's temp dir, `ray_current_cluster`) and,
    when its cluster was killed rather than stopped, retries the dead address for minutes. None when
    RAY_ADDRESS is set, nothing is recorded, or the recorded head's port accepts a connection.
    """
    if os.environ.get("RAY_ADDRESS"):
        return None
    from ray._private.utils import read_ray_address

    recorded = read_ray_address(temp_dir)
    if not recorded:
        return None
    host, _, port = recorded.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return None
    except (OSError, ValueError):
        return recorded


def started_here() -> bool:
    """Whether this process started the Ray it is connected to (a local instance, nothing to autoscale)."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    return bool(getattr(node, "head", False))


def check_resources(spec: SweepSpec, *, strict: bool | None = None) -> None:
    """A trial, and the sensitivity computation, must fit on some node of the cluster, or Tune waits forever.

    Strict (an error) on a Ray this driver started; on a cluster it attached to, an autoscaler may still
    add the node, so only a warning.
    """
    import ray

    nodes: list[dict[str, Any]] = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    trial = {"CPU": spec.resources.cpu, "GPU": spec.resources.gpu, **spec.resources.custom}
    sensitivity = {"CPU": spec.sensitivity.num_cpus, "GPU": spec.sensitivity.num_gpus}
    for what, need, fix in (
            ("a trial", trial, "lower --cpus-per-trial / --gpus-per-trial (`resources` in --config)"),
            ("the sensitivity computation", sensitivity, "lower `sensitivity.num_cpus` / `num_gpus` in --config")):
        if any(_fits(need, node) for node in nodes):
            continue
        largest = max(nodes, key=lambda n: (n.get("GPU", 0.0), n.get("CPU", 0.0)), default={})
        asked = ", ".join(f"{k}={v:g}" for k, v in need.items() if v > 0)
        has = ", ".join(f"{k}={largest.get(k, 0.0):g}" for k, v in need.items() if v > 0)
        message = (f"{what} asks for {asked} but no node of this Ray cluster has that much (largest: {has}); "
                   f"{fix}, or attach to a bigger cluster with --address")
        if strict if strict is not None else started_here():
            raise ValueError(message)
        logger.warning("%s (waiting for the cluster to grow)", message)
