"""Networks: the shared toolkit every capability imports.

- :mod:`.capture`: feature capture by module path (:class:`FeatureCapture`), module lookup, DDP unwrapping;
- :mod:`.tracing`: one tracing probe of a network (:func:`trace_network`): stage layers, the classifier head,
  mergeable BatchNorm pairs;
- :mod:`.modes`: train/eval mode for a block, restored module by module (:func:`restore_mode`);
- :mod:`.targets`: plain tensors, the image and label of a batch, checked class indices;
- :mod:`.profiling`: parameters, MACs, wall time;
- :mod:`.builders`: networks built from plain config data through an allow-list (:func:`build_network`);
- :mod:`.students`: compact students (:class:`ShallowCNN`, ...); :mod:`.introspect`: what a network expects.
"""

from __future__ import annotations

from .builders import (
    NETWORKS,
    build_network,
    check_network_spec,
    load_network,
    network_spec,
    register_network,
    set_network_spec,
)
from .capture import FeatureCapture, module_paths, resolve_module, unwrap_network
from .introspect import (
    check_network_input,
    in_channels_of,
    load_weights,
    num_classes_of,
    read_state_dict,
    spatial_dims_of,
)
from .modes import restore_mode
from .profiling import count_macs, count_parameters, latency_ms, latency_ratio, median_seconds, timed
from .students import ShallowCNN, densenet_student, resnet_student
from .targets import Target, as_plain_tensor, class_indices, device_of, float32_or_wider, resolve_targets, split_batch
from .tracing import LayerCall, NetworkTrace, trace_network

__all__ = [
    "NETWORKS",
    "build_network",
    "check_network_spec",
    "load_network",
    "network_spec",
    "register_network",
    "set_network_spec",
    "FeatureCapture",
    "module_paths",
    "resolve_module",
    "unwrap_network",
    "check_network_input",
    "in_channels_of",
    "load_weights",
    "read_state_dict",
    "num_classes_of",
    "spatial_dims_of",
    "restore_mode",
    "count_macs",
    "count_parameters",
    "latency_ms",
    "latency_ratio",
    "median_seconds",
    "timed",
    "ShallowCNN",
    "densenet_student",
    "resnet_student",
    "Target",
    "as_plain_tensor",
    "class_indices",
    "device_of",
    "float32_or_wider",
    "resolve_targets",
    "split_batch",
    "LayerCall",
    "NetworkTrace",
    "trace_network",
]
