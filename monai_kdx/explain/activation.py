"""Hierarchical activation maps: the channel-mean of several layers' feature maps from one forward
pass, each min-max normalized per sample and resized to the input (the hierarchical explanation
of the distillation research idea)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from monai_kdx.networks import FeatureCapture, unwrap_network

__all__ = ["conv_layer_paths", "minmax_normalize", "hierarchical_activation_maps"]


def conv_layer_paths(network: nn.Module) -> list[str]:
    """Module paths of every Conv1d/2d/3d layer, in definition order."""
    return [name for name, m in unwrap_network(network).named_modules() if isinstance(m, nn.modules.conv._ConvNd)]


def minmax_normalize(maps: torch.Tensor) -> torch.Tensor:
    """Scale each sample of (B, 1, *spatial) maps to [0, 1]; a constant map becomes all zeros (no NaN)."""
    flat = maps.flatten(1)
    low = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - low
    scaled = torch.where(span > 0, (flat - low) / span.clamp_min(torch.finfo(maps.dtype).tiny), torch.zeros_like(flat))
    return scaled.view_as(maps)


@torch.no_grad()
def hierarchical_activation_maps(
    network: nn.Module, inputs: torch.Tensor, layers: Sequence[str] | None = None
) -> dict[str, torch.Tensor]:
    """Channel-mean activation of each layer, normalized to [0, 1] and resized to the input.

    One forward pass; no gradients; the network's train/eval mode is restored.

    Args:
        network: a classifier (2D or 3D).
        inputs: (B, C, H, W) or (B, C, H, W, D).
        layers: module paths; ``None`` takes every convolution (see :func:`conv_layer_paths`).

    Returns:
        Ordered mapping from layer path to a (B, 1, *inputs.shape[2:]) map.
    """
    layers = conv_layer_paths(network) if layers is None else list(layers)
    was_training = network.training
    network.eval()
    try:
        with FeatureCapture(network, layers, detach=True) as features:
            network(inputs)
    finally:
        network.train(was_training)
    mode = "bilinear" if inputs.ndim == 4 else "trilinear"
    return {
        path: minmax_normalize(
            F.interpolate(features[path].mean(dim=1, keepdim=True), size=inputs.shape[2:], mode=mode)
        )
        for path in layers
    }
