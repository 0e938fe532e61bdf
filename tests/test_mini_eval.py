"""The mini-suite evidence table: exact trainable counts per method, chance, margins."""

import math
from pathlib import Path

import pytest

from spt_core.mini_eval import format_table, margin_over_chance, probe_table


def test_margin_over_chance_is_binomial_z() -> None:
    assert margin_over_chance(0.5, 0.5, 200) == 0.0
    assert math.isclose(margin_over_chance(0.2, 0.1, 200), 0.1 / math.sqrt(0.1 * 0.9 / 200))


def test_unknown_method_is_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown method.*nope"):
        probe_table(tmp_path, tasks=["cells"], methods=("linear", "nope"))
    assert not any(tmp_path.iterdir())


def test_probe_table_trains_each_method_on_the_generated_task(tmp_path: Path) -> None:
    rows = probe_table(tmp_path, tasks=["cells"], methods=("linear", "full"), epochs=1)
    by_method = {r["method"]: r for r in rows}
    assert set(by_method) == {"linear", "full"}
    linear, full = by_method["linear"], by_method["full"]
    dim = 96  # the embedded ViT's width; the cells task has 2 classes
    assert linear["trainable"] == 2 * dim + 2
    assert full["trainable"] > 100 * linear["trainable"]
    for r in rows:
        assert r["chance"] == 0.5 and r["n_val"] == 200 and r["n_test"] == 1000
        assert 0.0 <= r["final_val_acc"] <= 1.0 and 0.0 <= r["test_acc"] <= 1.0
    for split, key, n in (("test", "test_acc", 1000), ("val", "final_val_acc", 200)):
        table = format_table(rows, split=split).splitlines()
        assert table[0] == "| task | group | chance | linear | full | linear z |"
        assert table[2].split(" | ")[3:] == [f"{100 * linear[key]:.1f}", f"{100 * full[key]:.1f}",
                                              f"{margin_over_chance(linear[key], 0.5, n):+.1f} |"]
