"""Dictionary transforms: explanation maps written as MetaTensors with the input's metadata, and
gaze / mask targets for saliency regularization."""

from __future__ import annotations

from .explanation import (
    Attributiond,
    ExplanationFaithfulnessd,
    HierarchicalExplanationd,
    SaveExplanationFigured,
    as_meta_like,
)

__all__ = [
    "Attributiond",
    "ExplanationFaithfulnessd",
    "HierarchicalExplanationd",
    "SaveExplanationFigured",
    "as_meta_like",
]
