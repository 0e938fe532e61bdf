"""Evidence that the mini suite is meaningful: baselines per task on the embedded backbone.

``probe_table`` trains each method (linear probe, LoRA, full fine-tuning, ...) on train800 with a fixed
recipe and reports val200 and test accuracy of the last epoch next to chance, through the same recipe layer
the sweeps use (``spt_core.experiment``). Nothing is selected on test, so its 1000 images give the tighter
margin over chance.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from .data.mini import MINI_TASKS, write_mini_suite
from .experiment import BackboneRef, TaskRef, build_plan, eval_batch_size, load_backbone, make_loader, prepare_run
from .layout import ModelLayout
from .train import TrainConfig

# Learning rates per method: a head alone takes a larger step than the whole network.
PROBE_LR = {"linear": 1e-2, "lora": 5e-3, "adapter": 5e-3, "bitfit": 5e-3, "full": 1e-3}


def probe_table(root: str | Path, *, tasks: Sequence[str] | None = None,
                methods: Sequence[str] = ("linear", "lora", "full"), epochs: int = 30,
                lr: dict[str, float] | None = None, seed: int = 42, suite_seed: int = 0,
                backbone: BackboneRef | None = None, progress: bool = False) -> list[dict[str, Any]]:
    """One row per (task, method): group, classes, chance, trainable params (head included, so the linear
    probe's count is its head), best and final val accuracy, final test accuracy, seconds per epoch. The
    suite is written under ``root`` first if it is not there yet."""
    names = list(tasks or MINI_TASKS)
    unknown = [m for m in methods if m not in PROBE_LR]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; use any of {', '.join(PROBE_LR)}")
    write_mini_suite(root, seed=suite_seed, tasks=names)
    backbone = backbone or BackboneRef()
    rates = {**PROBE_LR, **(lr or {})}
    rows = []
    for name in names:
        task = TaskRef("mini", name, str(root))
        info = MINI_TASKS[name]
        layout = ModelLayout.from_model(load_backbone(backbone, task, seed=seed)[0])
        test = make_loader(task, "test", batch_size=eval_batch_size(TrainConfig()), train=False, seed=seed)
        for method in methods:
            cfg = TrainConfig(epochs=epochs, lr=rates[method], warmup_epochs=max(1, epochs // 10), seed=seed)
            trainer, train, val = prepare_run(task, backbone, build_plan(method, layout), cfg, seed=seed,
                                              progress=progress)
            history = trainer.fit(train, val)
            rows.append({
                "task": name, "group": info.group, "classes": info.num_classes,
                "chance": round(1 / info.num_classes, 4), "method": method, "lr": rates[method],
                "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
                "best_val_acc": max(h["val_acc"] for h in history), "final_val_acc": history[-1]["val_acc"],
                "n_val": len(val.dataset), "test_acc": trainer.evaluate(test)["acc"], "n_test": len(test.dataset),
                "s_per_epoch": round(sum(h["train_s"] for h in history) / len(history), 3),
            })
    return rows


def margin_over_chance(acc: float, chance: float, n: int) -> float:
    """How many binomial standard errors an accuracy on ``n`` images lies above chance."""
    return (acc - chance) / math.sqrt(chance * (1 - chance) / n)


def format_table(rows: list[dict[str, Any]], *, split: str = "test") -> str:
    """A Markdown table of ``probe_table`` rows: one line per task, final accuracy (%) on ``split`` ("test"
    or "val") per method, and the linear probe's margin over chance in binomial standard errors on that
    split (``linear z``; above 3 it clearly beats chance)."""
    if split not in ("test", "val"):
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")
    acc_key, n_key = ("test_acc", "n_test") if split == "test" else ("final_val_acc", "n_val")
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by_task: dict[str, dict[str, Any]] = {}
    for r in rows:
        entry = by_task.setdefault(r["task"], {"group": r["group"], "chance": r["chance"], "n": r[n_key]})
        entry[r["method"]] = r[acc_key]
    head = ["task", "group", "chance"] + methods + (["linear z"] if "linear" in methods else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task, v in by_task.items():
        cells = [task, v["group"], f"{100 * v['chance']:.1f}"] + [f"{100 * v[m]:.1f}" for m in methods]
        if "linear" in methods:
            cells.append(f"{margin_over_chance(v['linear'], v['chance'], v['n']):+.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
