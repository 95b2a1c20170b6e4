"""Explanations: the CAM core (hierarchical maps from one forward and one backward pass), pixel
attribution backends and activation maps, shared by transforms, losses and pruning."""

from __future__ import annotations

from .activation import conv_layer_paths, hierarchical_activation_maps, minmax_normalize
from .attribution import (
    AttributionExplainer,
    GradientShapAttribution,
    IntegratedGradientsAttribution,
    LRPAttribution,
    OcclusionAttribution,
    SaliencyAttribution,
    SmoothGradAttribution,
)
from .base import Explainer, build_explainer, check_inputs, check_target_range, explain
from .cam import CAM_MODES, CAMResult, HierarchicalCAM, cam_from_features, fuse_maps, stage_layers
from .concepts import TCAV, TCAVResult, concept_patches, fit_cav
from .lrp import LRP_COMPOSITES, lrp_composite, make_composite, residual_canonizer
from .zennit_backend import import_zennit

__all__ = [
    "AttributionExplainer",
    "GradientShapAttribution",
    "IntegratedGradientsAttribution",
    "LRPAttribution",
    "LRP_COMPOSITES",
    "OcclusionAttribution",
    "SaliencyAttribution",
    "SmoothGradAttribution",
    "make_composite",
    "lrp_composite",
    "residual_canonizer",
    "TCAV",
    "TCAVResult",
    "concept_patches",
    "fit_cav",
    "CAM_MODES",
    "CAMResult",
    "Explainer",
    "HierarchicalCAM",
    "build_explainer",
    "cam_from_features",
    "check_inputs",
    "check_target_range",
    "conv_layer_paths",
    "explain",
    "fuse_maps",
    "hierarchical_activation_maps",
    "import_zennit",
    "minmax_normalize",
    "stage_layers",
]
