"""Hierarchical activation maps: hand-checked channel means, normalization without NaN, 2D and 3D."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from monai_kdx.explain import conv_layer_paths, hierarchical_activation_maps, minmax_normalize
from monai_kdx.networks import ShallowCNN


def test_minmax_normalize_per_sample_and_constant_maps_are_zero():
    maps = torch.tensor([[[1.0, 3.0, 2.0]], [[5.0, 5.0, 5.0]]])
    out = minmax_normalize(maps)
    torch.testing.assert_close(out, torch.tensor([[[0.0, 1.0, 0.5]], [[0.0, 0.0, 0.0]]]))
    assert not torch.isnan(minmax_normalize(torch.zeros(2, 1, 4, 4))).any()


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_maps_equal_channel_mean_of_captured_layers(spatial_dims):
    torch.manual_seed(0)
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    net = nn.Sequential(conv(1, 3, 3, padding=1), nn.ReLU(), conv(3, 2, 3, padding=1)).train()
    x = torch.randn(2, 1, *[5] * spatial_dims)
    maps = hierarchical_activation_maps(net, x)
    assert list(maps) == conv_layer_paths(net) == ["0", "2"]
    with torch.no_grad():
        expected = minmax_normalize(net(x).mean(dim=1, keepdim=True))  # layer "2" is the output, same size
    torch.testing.assert_close(maps["2"], expected)
    assert net.training and maps["0"].shape == (2, 1, *[5] * spatial_dims)


def test_student_levels_resized_to_input_in_3d():
    net = ShallowCNN(3, 1, 4, channels=(4, 8)).eval()
    maps = hierarchical_activation_maps(net, torch.randn(1, 1, 16, 16, 16), ["blocks.0", "blocks.1"])
    assert all(m.shape == (1, 1, 16, 16, 16) and m.min() >= 0 and m.max() <= 1 for m in maps.values())
