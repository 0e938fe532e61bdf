"""spt_core: SPT (sensitivity-aware parameter-efficient fine-tuning) on timm vision transformers. No Ray here."""

from .allocate import allocate
from .baselines import BASELINES, bitfit, full_finetune, linear_probe, rank_for_budget, uniform_adapter, uniform_lora
from .compare import compare_allocations, format_comparison
from .export import load_delta, save_delta
from .layout import LogicalTensor, ModelLayout
from .modules.quant import quantize_weight
from .plan import TensorPlan, TuningPlan
from .released import load_plan_source, released_index, released_plan
from .sensitivity import Ranking, SensitivityMap, compute_sensitivity
from .surgery import apply_plan, merge_plan, trainable_parameters
from .train import Trainer, TrainConfig

__all__ = [
    "BASELINES", "LogicalTensor", "ModelLayout", "Ranking", "SensitivityMap", "TensorPlan", "Trainer", "TrainConfig",
    "TuningPlan", "allocate", "apply_plan", "bitfit", "compare_allocations", "compute_sensitivity",
    "format_comparison", "full_finetune", "linear_probe", "load_delta", "load_plan_source", "merge_plan",
    "quantize_weight", "rank_for_budget", "released_index", "released_plan", "save_delta", "trainable_parameters",
    "uniform_adapter", "uniform_lora",
]
