"""Ignite handlers and output transforms usable from bundle configs."""

from __future__ import annotations

from .budget import STOP_REASONS, TrainingBudget
from .guards import FiniteGuard
from .output_transforms import column, scalars, stacked
from .progress import ProgressBar
from .pruning import RelevancePruningHandler
from .saliency import SaliencyGuidance
from .tracking import MLflowModelLogger, MLflowRunHandler

__all__ = [
    "STOP_REASONS",
    "TrainingBudget",
    "FiniteGuard",
    "MLflowModelLogger",
    "MLflowRunHandler",
    "ProgressBar",
    "RelevancePruningHandler",
    "SaliencyGuidance",
    "column",
    "scalars",
    "stacked",
]
