"""Ignite handlers and output transforms usable from bundle configs."""

from __future__ import annotations

from .budget import STOP_REASONS, BestWeights, FinalEvaluation, TrainingStop, check_stopping
from .cases import CaseTable, read_case_table
from .guards import FiniteGuard
from .output_transforms import column, mean_of, scalars, stacked
from .progress import ProgressBar
from .pruning import RelevancePruningHandler
from .saliency import SaliencyGuidance
from .tracking import MLflowModelLogger, MLflowRunHandler

__all__ = [
    "STOP_REASONS",
    "BestWeights",
    "FinalEvaluation",
    "TrainingStop",
    "check_stopping",
    "CaseTable",
    "FiniteGuard",
    "MLflowModelLogger",
    "MLflowRunHandler",
    "ProgressBar",
    "RelevancePruningHandler",
    "SaliencyGuidance",
    "column",
    "mean_of",
    "read_case_table",
    "scalars",
    "stacked",
]
