"""Engines: the distillation trainer (a MONAI ``SupervisedTrainer``) and the rewiring of a running trainer onto a
new network (after pruning)."""

from __future__ import annotations

from .distillation import DistillationEvents, DistillationTrainer
from .rewiring import replace_network, rewrap_like

__all__ = ["DistillationEvents", "DistillationTrainer", "replace_network", "rewrap_like"]
