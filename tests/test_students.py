"""Students: 2D/3D shapes, smaller than the teacher, and exact MAC counting."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import DenseNet121
from torch import nn

from monai_kdx.networks import (
    FeatureCapture,
    ShallowCNN,
    count_macs,
    count_parameters,
    densenet_student,
    resnet_student,
)


def test_count_macs_matches_hand_count_and_restores_mode():
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(32, 3)).train()
    # conv: 2 x 4 x 4 outputs x (1 x 3 x 3) = 288; linear: 3 x 32 = 96
    assert count_macs(net, (1, 4, 4)) == 288 + 96
    assert net.training
    grouped = nn.Conv3d(4, 4, 3, padding=1, groups=2)
    assert count_macs(grouped, (4, 2, 2, 2)) == 4 * 8 * 2 * 27
    assert count_parameters(net) == 2 * 9 + 2 + 32 * 3 + 3


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_students_are_smaller_than_the_teacher_in_2d_and_3d(spatial_dims):
    shape = (1,) + (32,) * spatial_dims
    teacher = DenseNet121(spatial_dims=spatial_dims, in_channels=1, out_channels=4, init_features=16, growth_rate=8)
    teacher_convs = sum(isinstance(m, nn.modules.conv._ConvNd) for m in teacher.modules())
    for student in (
        ShallowCNN(spatial_dims, 1, 4),
        densenet_student(spatial_dims, 1, 4),
        resnet_student(spatial_dims, 1, 4),
    ):
        assert student.eval()(torch.zeros(2, *shape)).shape == (2, 4)
        assert count_parameters(student) < count_parameters(teacher)
        assert sum(isinstance(m, nn.modules.conv._ConvNd) for m in student.modules()) < teacher_convs / 4


def test_shallow_cnn_block_paths_halve_resolution():
    net = ShallowCNN(3, 1, 4, channels=(4, 8, 8)).eval()
    with torch.no_grad(), FeatureCapture(net, ["blocks.0", "blocks.2", "residual"]) as feats:
        net(torch.zeros(1, 1, 16, 16, 16))
    assert feats["blocks.0"].shape == (1, 4, 8, 8, 8)
    assert feats["blocks.2"].shape == feats["residual"].shape == (1, 8, 2, 2, 2)
    with pytest.raises(ValueError, match="spatial_dims"):
        ShallowCNN(4, 1, 2)
