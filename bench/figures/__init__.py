"""The measurements behind `bench/run.py`, one module per figure; each returns plain JSON-able dicts.

common (backbone, plans, a timed step), steps (step time, sensitivity pass), memory (peak memory, one fresh
subprocess per configuration), sparse_grad (sparse delta vs dense gradient, both entry-gradient kernels by shape),
lora_peft (LoRA vs HF PEFT), ranking (object-store bytes per trial), sweep (sweep overhead, Ray), query (DuckDB
over 1M rows).
"""

from .common import LORA_TARGETS, RELEASED, ROOT, SYNTHETIC_SIGMAS, ModelSpec, Runner, build_plans, median
from .common import synthetic_sensitivity
from .lora_peft import measure_lora_vs_peft, peft_available
from .memory import measure_memory
from .query import measure_results_query
from .ranking import measure_ranking_bytes
from .sparse_grad import measure_path_costs, measure_sparse_grad, measure_sparse_layer
from .steps import measure_sensitivity, measure_steps
from .sweep import measure_sweep_overhead

__all__ = ["LORA_TARGETS", "RELEASED", "ROOT", "SYNTHETIC_SIGMAS", "ModelSpec", "Runner", "build_plans",
           "measure_lora_vs_peft", "measure_memory", "measure_path_costs", "measure_ranking_bytes",
           "measure_results_query", "measure_sensitivity", "measure_sparse_grad", "measure_sparse_layer",
           "measure_steps", "measure_sweep_overhead", "median", "peft_available", "synthetic_sensitivity"]
