"""Compact students for distillation, in 2D and 3D.

- :class:`ShallowCNN`: the research idea's shallow student — five 3×3 conv blocks with max-pooling,
  a small residual block and a dense head; module paths ``blocks.0`` … ``blocks.4``, ``residual``,
  ``head``, so hierarchical maps read naturally from each block.
- :func:`densenet_student` / :func:`resnet_student`: reduced-depth members of the MONAI teacher
  families (fewer dense blocks, fewer residual layers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.layers.factories import Conv, Norm, Pool
from monai.networks.nets import DenseNet, ResNet
from torch import nn

__all__ = ["ResidualBlock", "ShallowCNN", "densenet_student", "resnet_student"]

NORMS = ("batch", "instance", "group")
"""Normalization layers :class:`ShallowCNN` accepts."""


def _norm_layer(norm: str, spatial_dims: int, channels: int) -> nn.Module:
    """A ``norm`` layer (one of :data:`NORMS`) over ``channels`` channels."""
    if norm == "batch":
        return Norm[Norm.BATCH, spatial_dims](channels)
    if norm == "instance":
        return Norm[Norm.INSTANCE, spatial_dims](channels, affine=True)
    return nn.GroupNorm(math.gcd(channels, 8), channels)


class ResidualBlock(nn.Module):
    """``relu(x + body(x))`` with ``body`` = conv → norm → ReLU → conv → norm (3×3, same width); input and output
    (B, C, *spatial)."""

    def __init__(self, spatial_dims: int, channels: int, norm: str = "batch") -> None:
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        self.body = nn.Sequential(
            conv(channels, channels, 3, padding=1, bias=False),
            _norm_layer(norm, spatial_dims, channels),
            nn.ReLU(inplace=True),
            conv(channels, channels, 3, padding=1, bias=False),
            _norm_layer(norm, spatial_dims, channels),
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


class ShallowCNN(nn.Module):
    """A shallow CNN student: conv blocks (3×3 conv → norm → ReLU → 2× max-pool), one residual block,
    global average pooling and a dense head.

    Input (B, C_in, H, W) or (B, C_in, H, W, D); output logits (B, out_channels). Block ``i`` outputs
    (B, channels[i], H/(s·2^(i+1)), …) with ``s = stem_stride``.

    With ``stem_stride=2`` the first convolution downsamples as DenseNet's stem does: the first block, the most
    expensive one at full resolution, costs a quarter (2D) or an eighth (3D), and so do its explanation's
    forward and backward passes; with four blocks its deepest level keeps 1/32 of the input size, like a
    DenseNet121's last dense block.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: number of classes.
        channels: output channels of each conv block (its length is the number of blocks).
        hidden: width of the dense head's hidden layer (0: a single linear layer).
        dropout: dropout before the last linear layer.
        stem_stride: stride of the first block's convolution (1: full resolution, the research idea's student).
        norm: normalization after each convolution: ``"batch"`` (BatchNorm, the default), ``"instance"``
            (InstanceNorm with learned affine parameters) or ``"group"`` (GroupNorm, ``gcd(channels, 8)``
            groups). Instance and group norms compute their statistics per sample, so the output of a sample
            does not depend on the rest of the batch, in training mode too: data-parallel training then
            matches one process on the global batch. InstanceNorm needs more than one spatial element per
            channel in training mode (an input of at least ``2^(len(channels)+1)`` per side); GroupNorm works
            on any size. Relevance pruning (Torch-Pruning) supports ``"batch"`` and ``"group"`` (the group
            count is kept), not ``"instance"``.

    Raises:
        ValueError: ``spatial_dims`` not 2 or 3, no conv block, a ``stem_stride`` < 1, or an unknown ``norm``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int] = (8, 16, 32, 64, 64),
        hidden: int = 32,
        dropout: float = 0.2,
        norm: str = "batch",
        stem_stride: int = 1,
    ) -> None:
        super().__init__()
        if isinstance(stem_stride, bool) or not isinstance(stem_stride, int) or stem_stride < 1:
            raise ValueError(f"stem_stride must be an integer >= 1, got {stem_stride!r}.")
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if not channels:
            raise ValueError("ShallowCNN needs at least one conv block.")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")
        conv = Conv[Conv.CONV, spatial_dims]
        pool = Pool[Pool.MAX, spatial_dims]
        blocks, previous = [], in_channels
        for index, width in enumerate(channels):
            stride = stem_stride if index == 0 else 1
            blocks.append(
                nn.Sequential(
                    conv(previous, width, 3, stride=stride, padding=1, bias=False),
                    _norm_layer(norm, spatial_dims, width),
                    nn.ReLU(inplace=True),
                    pool(2),
                )
            )
            previous = width
        self.blocks = nn.Sequential(*blocks)
        self.residual = ResidualBlock(spatial_dims, previous, norm)
        self.pool = Pool[Pool.ADAPTIVEAVG, spatial_dims](1)
        layers: list[nn.Module] = [nn.Flatten()]
        if hidden:
            layers += [nn.Linear(previous, hidden), nn.ReLU(inplace=True)]
            previous = hidden
        layers += [nn.Dropout(dropout), nn.Linear(previous, out_channels)]
        self.head = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.residual(self.blocks(x))))


def densenet_student(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    block_config: Sequence[int] = (4, 8),
    init_features: int = 8,
    growth_rate: int = 8,
) -> DenseNet:
    """A MONAI ``DenseNet`` with fewer dense blocks than DenseNet121's (6, 12, 24, 16).

    Module paths follow MONAI's: ``features.denseblock1`` … ``features.denseblock{len(block_config)}``.
    """
    return DenseNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        init_features=init_features,
        growth_rate=growth_rate,
        block_config=tuple(block_config),
    )


def resnet_student(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    layers: Sequence[int] = (1, 1, 1, 1),
    block_inplanes: Sequence[int] = (8, 16, 32, 64),
) -> ResNet:
    """A MONAI ``ResNet`` with basic blocks and reduced depth (ResNet-10 layout by default, narrow), and a
    3×3 stride-2 stem instead of the 7×7 stride-1 one, which dominates the cost of small 3D inputs.

    Module paths follow MONAI's: ``layer1`` … ``layer4``.
    """
    return ResNet(
        block="basic",
        layers=list(layers),
        block_inplanes=list(block_inplanes),
        spatial_dims=spatial_dims,
        n_input_channels=in_channels,
        num_classes=out_channels,
        conv1_t_size=3,
        conv1_t_stride=2,
    )
