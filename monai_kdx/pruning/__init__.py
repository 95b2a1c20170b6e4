"""Relevance pruning: channel relevance on calibration data (LRP, integrated gradients, Taylor,
DL-Backtrace-style propagation, magnitude and random baselines), structural pruning with
Torch-Pruning's dependency graph, and pruned models saved without pickled modules.

Example:
    >>> from monai_kdx.pruning import prune_by_relevance, save_pruned, load_pruned
    >>> small = prune_by_relevance(net, calibration_loader, ratio=0.5, method="lrp",
    ...                            builder={"network": "DenseNet121", "spatial_dims": 3,
    ...                                     "in_channels": 1, "out_channels": 2})
    >>> save_pruned(small, "pruned.pt")
    >>> same = load_pruned("pruned.pt")
"""

from __future__ import annotations

from .persistence import FORMAT, load_pruned, save_pruned
from .prune import RelevanceImportance, check_prunable, check_ratio, find_head, prune_by_relevance
from .relevance import (
    BacktraceRelevance,
    BatchRelevance,
    IntegratedGradientsRelevance,
    LRPRelevance,
    MagnitudeRelevance,
    RandomRelevance,
    RelevanceMethod,
    TaylorRelevance,
    collect_relevance,
    prunable_layers,
    resolve_relevance_method,
)

__all__ = [
    "collect_relevance",
    "prune_by_relevance",
    "save_pruned",
    "load_pruned",
    "RelevanceImportance",
    "check_prunable",
    "check_ratio",
    "find_head",
    "prunable_layers",
    "resolve_relevance_method",
    "RelevanceMethod",
    "BatchRelevance",
    "LRPRelevance",
    "TaylorRelevance",
    "IntegratedGradientsRelevance",
    "BacktraceRelevance",
    "MagnitudeRelevance",
    "RandomRelevance",
    "FORMAT",
]
