"""Networks: feature capture by module path (shared by distillation, explanations and pruning) and
network introspection, compact students and their size."""

from __future__ import annotations

from .builders import (
    NETWORKS,
    build_network,
    check_network_spec,
    network_spec,
    register_network,
    set_network_spec,
)
from .capture import FeatureCapture, module_paths, resolve_module, unwrap_network
from .introspect import load_weights, num_classes_of, spatial_dims_of
from .students import ShallowCNN, count_macs, count_parameters, densenet_student, resnet_student

__all__ = [
    "NETWORKS",
    "build_network",
    "check_network_spec",
    "network_spec",
    "register_network",
    "set_network_spec",
    "FeatureCapture",
    "module_paths",
    "resolve_module",
    "unwrap_network",
    "load_weights",
    "num_classes_of",
    "spatial_dims_of",
    "ShallowCNN",
    "densenet_student",
    "resnet_student",
    "count_parameters",
    "count_macs",
]
