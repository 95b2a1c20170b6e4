"""Explanations: hierarchical maps and attribution backends shared by transforms, losses and pruning."""

from __future__ import annotations

from .activation import conv_layer_paths, hierarchical_activation_maps, minmax_normalize
from .zennit_backend import import_zennit

__all__ = ["conv_layer_paths", "hierarchical_activation_maps", "import_zennit", "minmax_normalize"]
