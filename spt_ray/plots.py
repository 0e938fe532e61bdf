"""PNG figures of a sweep: Pareto fronts, accuracy by method against the baselines, sensitivity heatmaps."""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from spt_core.analysis import sensitivity_shares  # noqa: E402

from .report import BY_METHOD_SQL, PARETO_SQL  # noqa: E402
from .storage import Storage  # noqa: E402
from .store import MANIFEST_FILE, load_map  # noqa: E402

TRIALS_SQL = """SELECT task, method, trainable_params, val_acc FROM results
WHERE phase = 'search' AND row_kind = 'trial' AND val_acc IS NOT NULL ORDER BY task"""
MAX_BUDGET_SQL = "SELECT max(trainable_params) FROM results WHERE phase = 'search' AND method LIKE 'spt-%'"


def _grid(n: int) -> tuple[plt.Figure, list[plt.Axes]]:
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat[:n]


def pareto_figure(trials: list[tuple], front: list[tuple], path: Path) -> Path:
    by_task: dict[str, list[tuple]] = defaultdict(list)
    for task, method, params, acc in trials:
        by_task[task].append((method, params, acc))
    fronts: dict[str, list[tuple]] = defaultdict(list)
    for row in front:
        fronts[row[0]].append((row[7], row[8]))
    fig, axes = _grid(len(by_task))
    for ax, task in zip(axes, sorted(by_task)):
        for method in sorted({m for m, _, _ in by_task[task]}):
            pts = [(p, a) for m, p, a in by_task[task] if m == method]
            ax.scatter([max(1, p) for p, _ in pts], [a for _, a in pts], s=18, label=method, alpha=0.8)
        f = sorted(fronts[task])
        ax.step([max(1, p) for p, _ in f], [a for _, a in f], where="post", color="black", lw=1.2, label="front")
        ax.set_xscale("log")
        ax.set_title(task)
        ax.set_xlabel("trainable parameters (head excluded)")
        ax.set_ylabel("val accuracy")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def methods_figure(rows: list[tuple], path: Path) -> Path:
    by_task: dict[str, dict[str, float]] = defaultdict(dict)
    for task, method, acc, _, _ in rows:
        by_task[task][method] = acc
    methods = sorted({m for accs in by_task.values() for m in accs})
    tasks = sorted(by_task)
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(tasks)), 4))
    for i, method in enumerate(methods):
        xs = [t + (i - (len(methods) - 1) / 2) * width for t in range(len(tasks))]
        ax.bar(xs, [by_task[t].get(method, 0.0) for t in tasks], width, label=method)
    ax.set_xticks(range(len(tasks)), tasks, rotation=20)
    ax.set_ylabel("best val accuracy")
    ax.set_title("accuracy by method (SPT vs baselines)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def heatmap_figure(title: str, blocks: list[str], columns: list[str], shares, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(1.0 * len(columns) + 2, 0.35 * len(blocks) + 1.5))
    image = ax.imshow(shares.numpy(), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(blocks)), [b.replace("blocks.", "block ") for b in blocks])
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="share of top-k entries")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def stored_maps(storage: Storage) -> list[dict]:
    """Manifests of every sensitivity map persisted under the storage."""
    manifests = []
    for name in storage.list_files(storage.path("sensitivity"), MANIFEST_FILE):
        try:
            manifests.append(json.loads(storage.read_bytes(name)))
        except (OSError, ValueError):
            continue
    return manifests


def write_all(args: argparse.Namespace, run_sql: Callable, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    trials, _ = run_sql(args, TRIALS_SQL)
    front, _ = run_sql(args, PARETO_SQL)
    by_method, _ = run_sql(args, BY_METHOD_SQL)
    written = [pareto_figure(trials, front, out / "pareto.png"), methods_figure(by_method, out / "methods.png")]
    budget = args.budget or (run_sql(args, MAX_BUDGET_SQL)[0][0][0] or 0)
    storage = Storage.of(args.storage)
    for manifest in stored_maps(storage):
        fields = manifest["key_fields"]
        smap = load_map(storage, fields)
        k = int(budget) if budget else max(1, smap.num_entries // 100)
        blocks, columns, shares = sensitivity_shares(smap, k)
        title = f"{fields['task']}: top {k:,} sensitive entries by block and matrix"
        written.append(heatmap_figure(title, blocks, columns, shares, out / f"sensitivity_{fields['task']}.png"))
    return written
