"""spt_ray: SPT sweeps on Ray (sensitivity store actor, Tune trainable, per-task Optuna search, Parquet results).

The one entry point is `run_sweep(SweepSpec)`; everything else is exported for tools and tests.
"""

from .driver import SweepResult, pareto_front, run_sweep, select_best, summarize_final
from .results import SCHEMA, ResultsCallback, ResultsWriter, duckdb_connect, read_results
from .search import FixedSearcher, PerTaskScheduler, PerTaskSearcher
from .space import RankingNeeds, SearchSpace
from .spec import Resources, SchedulerSpec, SensitivitySpec, SweepSpec
from .storage import Storage
from .store import RankingHandle, SensitivityRequest, SensitivityStore, get_store
from .trainable import TrialContext, make_trainable, spt_trainable

__all__ = [
    "SCHEMA", "FixedSearcher", "PerTaskScheduler", "PerTaskSearcher", "RankingHandle", "RankingNeeds", "Resources",
    "ResultsCallback", "ResultsWriter", "SchedulerSpec", "SearchSpace", "SensitivityRequest", "SensitivitySpec",
    "SensitivityStore", "Storage", "SweepResult", "SweepSpec", "TrialContext", "duckdb_connect", "get_store",
    "make_trainable", "pareto_front", "read_results", "run_sweep", "select_best", "spt_trainable", "summarize_final",
]
