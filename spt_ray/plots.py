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
from typing import Any, NamedTuple

import matplotlib
import pyarrow as pa

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from spt_core.analysis import sensitivity_shares  # noqa: E402

from .selection import candidates, front_cost, front_with_test, pareto_front, summarize_final  # noqa: E402
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


class Bar(NamedTuple):
    """One bar of methods.png: accuracy mean / spread (fractions), the per-seed values, trainable parameters."""

    mean: float
    std: float
    values: tuple[float, ...]
    params: int | None


def _colors(methods: list[str]) -> dict[str, Any]:
    """One colour per method across every panel (a panel that lacks a method must not shift the others)."""
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(sorted(methods))}


def _short(n: float) -> str:
    """1234 -> 1.2k, 1234567 -> 1.2M: parameter counts short enough for tick labels."""
    return f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n / 1e3:.3g}k" if n >= 1e3 else f"{n:.0f}"


def _percent_axis(ax: plt.Axes, values: list[float], label: str) -> None:
    """Accuracy in % (the unit of every table a person reads), never beyond [0, 100]."""
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    pad = max(0.02, 0.08 * (hi - lo))
    ax.set_ylim(100 * max(0.0, lo - pad), 100 * min(1.0, hi + pad))
    ax.set_ylabel(label)


def _params_axis(ax: plt.Axes, params: list[int]) -> None:
    """A log axis of parameter counts with few, short, labelled ticks: 1, 2, 5 per decade over a narrow range,
    one per decade over a wide one (matplotlib's minor log labels overlapped into a smear)."""
    lo, hi = min(params), max(params)
    ax.set_xscale("log")
    ax.set_xlim(lo / 1.6, hi * 1.6)
    decades = math.log10(hi * 1.6) - math.log10(lo / 1.6)
    subs = (1.0, 2.0, 5.0) if decades < 2 else (1.0,)
    ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=subs, numticks=8))
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: _short(v)))


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def pareto_figure(trials: list[Row], fronts: dict[str, list[Row]], selection: dict[str, Row], path: Path,
                  cost: str = "trainable_params") -> Path:
    return _save(pareto_plot(trials, fronts, selection, cost), path)


def pareto_plot(trials: list[Row], fronts: dict[str, list[Row]], selection: dict[str, Row],
                cost: str = "trainable_params") -> plt.Figure:
    """Per task: every candidate trial by method, the Pareto front over (val accuracy, `cost`: trainable
    parameters, or storage bytes in multi-objective mode), its points' test accuracy (mean +- std over the
    final seeds, where front rows carry `test_mean`: selection.front_with_test), and the selected trial (a
    star); one legend for the figure, every method in one colour everywhere."""
    by_task: dict[str, list[Row]] = defaultdict(list)
    for r in trials:
        by_task[r["task"]].append(r)
    colors = _colors(list({r["method"] for r in trials}))
    fig, axes = _grid(max(1, len(by_task)))
    for ax, task in zip(axes, sorted(by_task)):
        for method in sorted({r["method"] for r in by_task[task]}):
            pts = [r for r in by_task[task] if r["method"] == method]
            ax.scatter([max(1, r[cost]) for r in pts], [100 * r["val_acc"] for r in pts], s=18,
                       color=colors[method], alpha=0.8)
        f = fronts.get(task, [])
        ax.step([max(1, r[cost]) for r in f], [100 * r["val_acc"] for r in f], where="post",
                color="black", lw=1.2)
        tested = [r for r in f if r.get("test_mean") is not None]
        if tested:
            ax.errorbar([max(1, r[cost]) for r in tested], [100 * r["test_mean"] for r in tested],
                        yerr=[100 * r["test_std"] for r in tested], fmt="D", ms=5, mfc="none", color="black",
                        capsize=2, lw=0.8, zorder=3)
        if task in selection:
            sel = selection[task]
            ax.scatter([max(1, sel[cost])], [100 * sel["val_acc"]], marker="*", s=220,
                       facecolors="none", edgecolors="red", linewidths=1.4, zorder=3, clip_on=False)  # dot inside
        _params_axis(ax, [max(1, r[cost]) for r in by_task[task]])
        ax.set_title(task)
        ax.set_xlabel("trainable parameters (head excluded)" if cost == "trainable_params"
                      else "storage of the task delta (bytes)")
        _percent_axis(ax, [r["val_acc"] for r in by_task[task]]
                      + [r["test_mean"] + side * r["test_std"] for r in tested for side in (-1, 1)],  # whole bars
                      "accuracy (%): val, test on the front")
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], marker="o", ls="", color=c, label=m) for m, c in colors.items()]
    handles += [Line2D([], [], color="black", label="Pareto front"),
                Line2D([], [], marker="D", ls="", mfc="none", color="black", label="front: test (final seeds)"),
                Line2D([], [], marker="*", ls="", ms=12, markerfacecolor="none", markeredgecolor="red",
                       label="selected")]
    ncol = min(len(handles), 3 * min(4, len(axes)))
    rows = math.ceil(len(handles) / ncol)
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, (0.05 + 0.22 * rows) / fig.get_figheight(), 1, 1))
    return fig


def method_bars(table: pa.Table, selection: dict[str, Row]) -> tuple[dict[str, dict[str, Bar]], str]:
    """Per task and label: the Bar to draw, and what its accuracy is.

    With a final phase: its test accuracy per label over the seeds (the selected SPT config as "SPT
    (selected)"; a baseline whose budget is not within +-10% of SPT's says its ratio). Before it: the
    selected trial's val accuracy and the completed baseline trials' best (the same candidates rule,
    baselines instead of SPT), which the axis label says.
    """
    final = summarize_final(table)
    bars: dict[str, dict[str, Bar]] = defaultdict(dict)
    if final:
        for task, labels in final.items():
            for label, e in labels.items():
                name = "SPT (selected)" if label == "best" else label
                if label != "best" and e["budget_ratio"] is not None and not e["equal_budget"]:
                    name += f" (x{e['budget_ratio']:.2f} budget)"
                bars[task][name] = Bar(e["mean"], e["std"], tuple(e["test_acc"]), e["trainable_params"])
        return bars, "final test accuracy (%), mean ± std over seeds"
    for task, sel in selection.items():
        bars[task]["SPT (selected)"] = Bar(sel["val_acc"], 0.0, (sel["val_acc"],), sel["trainable_params"])
    for r in table.to_pylist():
        if (r["phase"], r["row_kind"], r["status"], r["searched"]) == ("search", "trial", "completed", False) \
                and r["val_acc"] is not None:
            best = bars[r["task"]].get(r["method"])
            if best is None or r["val_acc"] > best.mean:
                bars[r["task"]][r["method"]] = Bar(r["val_acc"], 0.0, (r["val_acc"],), r["trainable_params"])
    return bars, "val accuracy (%): no final phase yet"


def methods_figure(bars: dict[str, dict[str, Bar]], what: str, path: Path) -> Path:
    return _save(methods_plot(bars, what), path)


def methods_plot(bars: dict[str, dict[str, Bar]], what: str) -> plt.Figure:
    """Grouped bars per task: SPT's selected config first, then every baseline; the seeds as dots, the
    spread as an error bar and the trainable parameters written above each bar."""
    def slot(label: str) -> str:  # "lora (x1.12 budget)" shares the "lora" slot; the ratio goes above its bar
        return label.split(" (x")[0]

    labels = sorted({slot(m) for accs in bars.values() for m in accs}, key=lambda m: (not m.startswith("SPT"), m))
    colors = dict(zip(labels, [plt.get_cmap("tab10")(i % 10) for i in range(len(labels))]))
    tasks = sorted(bars)
    width = 0.8 / max(1, len(labels))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 + len(tasks) * (0.45 * len(labels) + 0.4)), 4.4))
    for t, task in enumerate(tasks):
        for full_label, bar in bars[task].items():
            label = slot(full_label)
            i = labels.index(label)
            x = t + (i - (len(labels) - 1) / 2) * width
            ax.bar(x, 100 * bar.mean, width * 0.92, yerr=100 * bar.std if len(bar.values) > 1 else None,
                   color=colors[label], capsize=2)
            if len(bar.values) > 1:
                ax.scatter([x] * len(bar.values), [100 * v for v in bar.values], s=8, color="black", zorder=3)
            text = _short(bar.params) if bar.params is not None else "-"
            if full_label != label:
                text += "\n" + full_label[len(label):].strip(" ()").replace(" budget", "")
            top = 100 * max(bar.mean + bar.std, *bar.values)
            ax.annotate(text, (x, top), xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                        fontsize=7, rotation=90 if width < 0.15 else 0)
    handles = [Patch(color=colors[label], label=label) for label in labels]
    ax.legend(handles=handles, fontsize=7, ncol=min(5, len(labels)), loc="upper center",
              bbox_to_anchor=(0.5, -0.08), frameon=False)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylim(0, 112)  # room above 100% for the parameter counts
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel(what)
    ax.set_title("selected SPT config vs baselines\nabove bars: trainable parameters (head excluded); "
                 "xN: budget ratio to SPT's", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def heatmap_figure(title: str, blocks: list[str], columns: list[str], shares, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(1.0 * len(columns) + 2, 0.35 * len(blocks) + 1.5))
    image = ax.imshow(shares.numpy(), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(blocks)), [b.replace("blocks.", "block ") for b in blocks])
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="share of top-k entries")
    fig.tight_layout()
    return _save(fig, path)


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
    sweeps = [s for s in table.column("sweep").to_pylist() if s] if "sweep" in table.column_names else []
    cost = front_cost(storage, sweeps[0]) if sweeps else "trainable_params"
    fronts = front_with_test(pareto_front(table, cost), summarize_final(table), selection)
    written = [pareto_figure(candidates(table), fronts, selection, out / "pareto.png", cost),
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
