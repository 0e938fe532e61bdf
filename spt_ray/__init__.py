"""spt_ray: SPT sweeps on Ray (sensitivity store actor, Tune trainable, per-task Optuna search, Parquet results).

The one entry point is `run_sweep(SweepSpec)`; everything else is exported for tools and tests. Names are
imported on first use, so light commands (`spt-ray cluster validate`) do not pay for Ray and torch.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "driver": ("SweepResult", "pareto_front", "run_sweep", "select_best", "summarize_final"),
    "results": ("SCHEMA", "ResultsCallback", "ResultsWriter", "duckdb_connect", "read_results"),
    "search": ("FixedSearcher", "PerTaskScheduler", "PerTaskSearcher"),
    "space": ("RankingNeeds", "SearchSpace"),
    "spec": ("Resources", "SchedulerSpec", "SensitivitySpec", "SweepSpec"),
    "storage": ("Storage",),
    "store": ("RankingHandle", "SensitivityRequest", "SensitivityStore", "get_store"),
    "trainable": ("TrialContext", "make_trainable", "spt_trainable"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'spt_ray' has no attribute {name!r}")
    value = getattr(import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value
    return value
