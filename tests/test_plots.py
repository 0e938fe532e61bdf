"""The figures say what their titles say: one legend naming every method, accuracy in % within [0, 100],
tick labels that do not overlap, and methods.png's bars at the final test mean with seeds and parameters."""

import pytest

from spt_ray.plots import Bar, methods_plot, pareto_plot


def _trial(task, method, params, acc, tid):
    return {"task": task, "method": method, "trainable_params": params, "val_acc": acc, "trial_id": tid}


# spt-lora exists only in the second panel; accuracies near 1.0 (the old axis ran past it); parameter counts
# over four decades (the old minor log labels smeared into one)
TRIALS = [_trial("count", "spt-adapter", 600, 0.91, "a1"), _trial("count", "spt-adapter", 2_000_000, 0.995, "a2"),
          _trial("shapes", "spt-adapter", 7_000, 0.42, "b1"), _trial("shapes", "spt-lora", 9_500, 0.97, "b2"),
          _trial("shapes", "spt-lora", 12_000, 0.96, "b3"), _trial("shapes", "spt-lora", 18_000, 0.99, "b4")]
FRONTS = {"count": TRIALS[:2], "shapes": [TRIALS[2], TRIALS[3], TRIALS[5]]}
SELECTION = {"count": TRIALS[1], "shapes": TRIALS[5]}


def _visible_xlabels(fig, ax):
    renderer = fig.canvas.get_renderer()
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.xaxis.get_major_ticks() if lo <= t.get_loc() <= hi and t.label1.get_text()]
    return [t.label1.get_window_extent(renderer) for t in ticks], [t.label1.get_text() for t in ticks]


def test_pareto_has_one_legend_with_every_method_percent_axes_and_readable_ticks():
    fig = pareto_plot(TRIALS, FRONTS, SELECTION)
    fig.canvas.draw()
    assert len(fig.legends) == 1 and all(ax.get_legend() is None for ax in fig.axes)
    names = {t.get_text() for t in fig.legends[0].get_texts()}
    assert {"spt-adapter", "spt-lora", "Pareto front", "selected"} <= names
    for ax in fig.axes:
        low, high = ax.get_ylim()
        assert 0 <= low < high <= 100 and "%" in ax.get_ylabel()
        boxes, texts = _visible_xlabels(fig, ax)
        assert 2 <= len(boxes) <= 8, texts
        assert all(not a.overlaps(b) for a, b in zip(boxes, boxes[1:])), texts
        assert all(len(t) <= 5 for t in texts), texts  # 2M, 10k, 500: short labels
    # every point is drawn in % (the selected star of count at 99.5)
    star = [c for c in fig.axes[0].collections if c.get_offsets().shape[0] == 1][-1]
    assert star.get_offsets()[0][1] == pytest.approx(99.5)


def test_methods_bars_are_final_test_means_with_seeds_and_parameters():
    bars = {"count": {"SPT (selected)": Bar(0.62, 0.04, (0.58, 0.66), 6_196),
                      "linear": Bar(0.5, 0.0, (0.5, 0.5), 0),
                      "lora (x1.12 budget)": Bar(0.6, 0.1, (0.5, 0.7), 6_912)},
            "shapes": {"SPT (selected)": Bar(0.3, 0.02, (0.28, 0.32), 7_246), "lora": Bar(0.31, 0.0, (0.31,), 6_912)}}
    fig = methods_plot(bars, "final test accuracy (%), mean ± std over seeds")
    ax = fig.axes[0]
    heights = sorted(round(p.get_height(), 6) for p in ax.patches)
    assert heights == sorted([62.0, 50.0, 60.0, 30.0, 31.0])  # one bar per task and method, in %
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["SPT (selected)", "linear", "lora"]  # the unequal-budget lora shares lora's slot
    notes = [t.get_text() for t in ax.texts]
    assert "6.2k" in notes and "0" in notes and "6.91k\nx1.12" in notes and "7.25k" in notes
    assert ax.get_ylim()[0] == 0 and "%" in ax.get_ylabel()
