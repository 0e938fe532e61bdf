"""PNG figures of ONE sweep: Pareto fronts, accuracy by method against the baselines, sensitivity heatmaps.

The data comes from `spt_ray.selection` (the candidates, the front, the driver's selection, the final
summary), never from a query of its own, so a figure shows what `spt-ray results best / pareto / final`
print. This module does not import `spt_ray.report` (the report imports it, one direction only).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib
import pyarrow as pa

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from spt_core.analysis import sensitivity_shares  # noqa: E402

from .selection import candidates, pareto_front, summarize_final  # noqa: E402
from .storage import Storage  # noqa: E402
from .store import MANIFEST_FILE, load_map  # noqa: E402

Row = dict[str, Any]


def _grid(n: int) -> tuple[plt.Figure, list[plt.Axes]]:
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat[:n]


def pareto_figure(trials: list[Row], fronts: dict[str, list[Row]], selection: dict[str, Row], path: Path) -> Path:
    """Per task: every candidate trial by method, the Pareto front, and the selected trial (a star)."""
    by_task: dict[str, list[Row]] = defaultdict(list)
    for r in trials:
        by_task[r["task"]].append(r)
    fig, axes = _grid(max(1, len(by_task)))
    for ax, task in zip(axes, sorted(by_task)):
        for method in sorted({r["method"] for r in by_task[task]}):
            pts = [r for r in by_task[task] if r["method"] == method]
            ax.scatter([max(1, r["trainable_params"]) for r in pts], [r["val_acc"] for r in pts], s=18, label=method,
                       alpha=0.8)
        f = fronts.get(task, [])
        ax.step([max(1, r["trainable_params"]) for r in f], [r["val_acc"] for r in f], where="post", color="black",
                lw=1.2, label="front")
        if task in selection:
            sel = selection[task]
            ax.scatter([max(1, sel["trainable_params"])], [sel["val_acc"]], marker="*", s=160, color="red",
                       zorder=3, label="selected")
        ax.set_xscale("log")
        ax.set_title(task)
        ax.set_xlabel("trainable parameters (head excluded)")
        ax.set_ylabel("val accuracy")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def method_bars(table: pa.Table, selection: dict[str, Row]) -> tuple[dict[str, dict[str, tuple[float, float]]], str]:
    """Per task and label: (accuracy, std) to draw, and what the accuracy is.

    With a final phase: its test mean and std per label (the selected SPT config as "SPT (selected)";
    a baseline whose budget is not within +-10% of SPT's says its ratio). Before it: the selected trial's
    val accuracy and the completed baseline trials' (the same candidates rule, baselines instead of SPT).
    """
    final = summarize_final(table)
    bars: dict[str, dict[str, tuple[float, float]]] = defaultdict(dict)
    if final:
        for task, labels in final.items():
            for label, e in labels.items():
                name = "SPT (selected)" if label == "best" else label
                if label != "best" and e["budget_ratio"] is not None and not e["equal_budget"]:
                    name += f" (x{e['budget_ratio']:.2f} budget)"
                bars[task][name] = (e["mean"], e["std"])
        return bars, "final test accuracy (mean ± std over seeds)"
    for task, sel in selection.items():
        bars[task]["SPT (selected)"] = (sel["val_acc"], 0.0)
    for r in table.to_pylist():
        if (r["phase"], r["row_kind"], r["status"], r["searched"]) == ("search", "trial", "completed", False) \
                and r["val_acc"] is not None:
            best = bars[r["task"]].get(r["method"], (-1.0, 0.0))[0]
            bars[r["task"]][r["method"]] = (max(best, r["val_acc"]), 0.0)
    return bars, "val accuracy (selected SPT trial, baseline trials)"


def methods_figure(bars: dict[str, dict[str, tuple[float, float]]], what: str, path: Path) -> Path:
    labels = sorted({m for accs in bars.values() for m in accs}, key=lambda m: (not m.startswith("SPT"), m))
    tasks = sorted(bars)
    width = 0.8 / max(1, len(labels))
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(tasks)), 4))
    for i, label in enumerate(labels):
        xs = [t + (i - (len(labels) - 1) / 2) * width for t in range(len(tasks))]
        values = [bars[t].get(label, (0.0, 0.0)) for t in tasks]
        ax.bar(xs, [v for v, _ in values], width, yerr=[e for _, e in values], label=label)
    ax.set_xticks(range(len(tasks)), tasks, rotation=20)
    ax.set_ylabel(what)
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


def write_all(storage: Storage, table: pa.Table, selection: dict[str, Row], out: Path, *,
              budget: int | None = None) -> list[Path]:
    """Every figure of one sweep (`table`: its results; `selection`: the driver's) into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    written = [pareto_figure(candidates(table), pareto_front(table), selection, out / "pareto.png"),
               methods_figure(*method_bars(table, selection), out / "methods.png")]
    keys = {k for k in table.column("sensitivity_key").to_pylist() if k}
    for manifest in stored_maps(storage):
        fields = manifest["key_fields"]
        if manifest.get("key") not in keys:
            continue  # another sweep's map
        smap = load_map(storage, fields)
        chosen = selection.get(fields["task"], {}).get("trainable_params")
        k = int(budget or chosen or max(1, smap.num_entries // 100))
        blocks, columns, shares = sensitivity_shares(smap, k)
        title = f"{fields['task']}: top {k:,} sensitive entries by block and matrix"
        written.append(heatmap_figure(title, blocks, columns, shares, out / f"sensitivity_{fields['task']}.png"))
    return written
