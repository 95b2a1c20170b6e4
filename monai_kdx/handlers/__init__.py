"""Ignite handlers and output transforms usable from bundle configs."""

from __future__ import annotations

from .progress import ProgressBar, stacked

__all__ = ["ProgressBar", "stacked"]
