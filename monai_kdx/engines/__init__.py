"""Engines: the distillation trainer (a MONAI ``SupervisedTrainer``)."""

from __future__ import annotations

from .distillation import DistillationEvents, DistillationTrainer

__all__ = ["DistillationEvents", "DistillationTrainer"]
