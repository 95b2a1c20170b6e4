"""Explanations: attribution backends shared by explanation transforms, saliency losses and pruning."""

from __future__ import annotations

from .zennit_backend import import_zennit

__all__ = ["import_zennit"]
