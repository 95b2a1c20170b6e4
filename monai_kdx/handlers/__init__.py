"""Ignite handlers and output transforms usable from bundle configs."""

from __future__ import annotations

from .output_transforms import scalars, stacked
from .progress import ProgressBar

__all__ = ["ProgressBar", "scalars", "stacked"]
