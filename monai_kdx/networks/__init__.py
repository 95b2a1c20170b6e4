"""Networks: feature capture by module path (shared by distillation, explanations and pruning)."""

from __future__ import annotations

from .capture import FeatureCapture, module_paths, resolve_module, unwrap_network

__all__ = ["FeatureCapture", "module_paths", "resolve_module", "unwrap_network"]
