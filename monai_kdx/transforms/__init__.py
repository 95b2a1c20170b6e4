"""MONAI dictionary transforms (2D and 3D): explanation maps written as MetaTensors with the
input's metadata, and gaze fixations / lesion masks turned into saliency targets."""

from __future__ import annotations

from .explanation import (
    Attributiond,
    ExplanationFaithfulnessd,
    ExplanationLocalizationd,
    HierarchicalExplanationd,
    SaveExplanationFigured,
    as_meta_like,
)
from .gaze import GazeToHeatmapd, MaskToSaliencyd, affine_spacing, map_fixations
from .naming import CaseFolderLayout, case_name

__all__ = [
    "Attributiond",
    "CaseFolderLayout",
    "case_name",
    "ExplanationFaithfulnessd",
    "ExplanationLocalizationd",
    "GazeToHeatmapd",
    "HierarchicalExplanationd",
    "MaskToSaliencyd",
    "SaveExplanationFigured",
    "affine_spacing",
    "as_meta_like",
    "map_fixations",
]
