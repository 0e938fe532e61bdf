"""spt_core: SPT (sensitivity-aware parameter-efficient fine-tuning) on timm vision transformers. No Ray here."""

from .allocate import allocate
from .baselines import BASELINES, bitfit, full_finetune, linear_probe, rank_for_budget, uniform_adapter, uniform_lora
from .layout import LogicalTensor, ModelLayout
from .plan import TensorPlan, TuningPlan
from .sensitivity import Ranking, SensitivityMap, compute_sensitivity
from .surgery import apply_plan, merge_plan, trainable_parameters
from .train import Trainer, TrainConfig

__all__ = [
    "BASELINES", "LogicalTensor", "ModelLayout", "Ranking", "SensitivityMap", "TensorPlan", "Trainer", "TrainConfig",
    "TuningPlan", "allocate", "apply_plan", "bitfit", "compute_sensitivity", "full_finetune", "linear_probe",
    "merge_plan", "rank_for_budget", "trainable_parameters", "uniform_adapter", "uniform_lora",
]
