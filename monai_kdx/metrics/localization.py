"""Localization metrics: how well an attribution map points at the ground-truth region (lesion mask).

* pointing game (Zhang et al., "Top-down neural attention by excitation backprop"): is the map's maximum
  inside the (optionally dilated) mask;
* relevance mass accuracy and relevance rank accuracy (Arras et al., "CLEVR-XAI: a benchmark dataset for
  the ground truth evaluation of neural network explanations").

Maps and masks are (B, 1, H, W) in 2D or (B, 1, H, W, D) in 3D, of any floating dtype (computed in float32 at
least); every function returns (B,) in float32 (float64 for float64 maps). An empty mask leaves localization
undefined: by default it raises ``ValueError`` naming the samples; with ``ignore_empty=True`` those samples get
NaN, which MONAI's reductions skip. A constant attribution map (e.g. an all-zero Grad-CAM) has no maximum and no
ranking: the pointing game and rank accuracy give it 0, never a hit because the mask happens to cover the first
positions in row-major order (its relevance mass is 0 when it is all zeros, the mask's share of the positions
when it is a positive constant).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from monai.utils import MetricReduction

from ._common import (
    MapMetric,
    check_empty_masks,
    check_pair,
    descending_ranks,
    flatten_samples,
    is_constant,
    safe_divide,
)

__all__ = [
    "pointing_game",
    "relevance_mass",
    "relevance_rank_accuracy",
    "PointingGameMetric",
    "RelevanceMassMetric",
    "RelevanceRankAccuracyMetric",
]


def _nan_where(values: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    return torch.where(empty, torch.full_like(values, torch.nan), values)


def pointing_game(attribution: Any, mask: Any, tolerance: int = 0, ignore_empty: bool = False) -> torch.Tensor:
    """Pointing game hit: 1.0 if the attribution's maximum lies in the mask dilated by ``tolerance``, else 0.0.

    The maximum is the first argmax in flattened (row-major) order when several positions tie; a constant map
    (e.g. all zeros) has no maximum and scores 0. The dilation is a square (2D) or cube (3D) neighbourhood: a
    hit is a mask pixel/voxel within Chebyshev distance ``tolerance`` of the maximum.

    Args:
        attribution: (B, 1, H, W) or (B, 1, H, W, D), any real values and floating dtype.
        mask: binary (0/1, bool or integer accepted) ground-truth region, same shape.
        tolerance: dilation radius in pixels/voxels, >= 0.
        ignore_empty: give NaN for samples with an empty mask instead of raising.

    Returns:
        (B,) hits (0.0 or 1.0; 0.0 for a constant map; NaN for ignored empty masks).

    Raises:
        TypeError: a non-tensor input.
        ValueError: wrong shape or ndim, shape mismatch, NaN/inf values, non-binary mask, negative
            ``tolerance``, an empty mask (unless ``ignore_empty``).
    """
    if int(tolerance) != tolerance or tolerance < 0:
        raise ValueError(f"tolerance must be a non-negative integer, got {tolerance!r}.")
    attribution, mask = check_pair(attribution, mask, "attribution", "mask", binary_b=True)
    empty = check_empty_masks(mask, ignore_empty)
    if tolerance > 0:
        pool = F.max_pool2d if mask.ndim == 4 else F.max_pool3d
        mask = pool(mask, kernel_size=2 * int(tolerance) + 1, stride=1, padding=int(tolerance))
    flat = flatten_samples(attribution)
    hit = torch.gather(flatten_samples(mask), 1, flat.argmax(dim=1, keepdim=True)).squeeze(1)
    hit = torch.where(is_constant(flat), torch.zeros_like(hit), hit)
    return _nan_where(hit, empty)


def relevance_mass(attribution: Any, mask: Any, ignore_empty: bool = False) -> torch.Tensor:
    """Relevance mass accuracy: the share of positive relevance that falls inside the mask, in [0, 1].

    ``sum(R+ inside mask) / sum(R+)`` with ``R+ = max(R, 0)``; negative relevance is ignored.

    Args:
        attribution: (B, 1, H, W) or (B, 1, H, W, D), any real values.
        mask: binary ground-truth region, same shape.
        ignore_empty: give NaN for samples with an empty mask instead of raising.

    Returns:
        (B,) shares; 0 for a map without positive relevance (e.g. all zeros).

    Raises:
        TypeError: a non-tensor input.
        ValueError: wrong shape or ndim, shape mismatch, NaN/inf values, non-binary mask, an empty mask
            (unless ``ignore_empty``).
    """
    attribution, mask = check_pair(attribution, mask, "attribution", "mask", binary_b=True)
    empty = check_empty_masks(mask, ignore_empty)
    positive = flatten_samples(attribution).clamp_min(0)
    inside = (positive * flatten_samples(mask)).sum(dim=1)
    total = positive.sum(dim=1)
    return _nan_where(safe_divide(inside, total), empty)


def relevance_rank_accuracy(attribution: Any, mask: Any, ignore_empty: bool = False) -> torch.Tensor:
    """Relevance rank accuracy: with K the mask size, the fraction of the K most relevant positions in the mask.

    Positions of equal relevance are ranked by flat (row-major) index; a constant map (e.g. all zeros) ranks
    nothing and scores 0.

    Args:
        attribution: (B, 1, H, W) or (B, 1, H, W, D), any real values.
        mask: binary ground-truth region, same shape (K may differ between samples).
        ignore_empty: give NaN for samples with an empty mask instead of raising.

    Returns:
        (B,) accuracies in [0, 1]; 0 for a constant map.

    Raises:
        TypeError: a non-tensor input.
        ValueError: wrong shape or ndim, shape mismatch, NaN/inf values, non-binary mask, an empty mask
            (unless ``ignore_empty``).
    """
    attribution, mask = check_pair(attribution, mask, "attribution", "mask", binary_b=True)
    empty = check_empty_masks(mask, ignore_empty)
    inside = flatten_samples(mask) > 0
    k = inside.sum(dim=1, keepdim=True)
    flat = flatten_samples(attribution)
    top_k = descending_ranks(flat) < k
    accuracy = safe_divide((top_k & inside).sum(dim=1).to(attribution.dtype), k.squeeze(1))
    accuracy = torch.where(is_constant(flat), torch.zeros_like(accuracy), accuracy)
    return _nan_where(accuracy, empty)


class _LocalizationMetric(MapMetric):
    """A localization metric with ``y_pred`` = attribution and ``y`` = mask, and the empty-mask policy."""

    def __init__(
        self,
        ignore_empty: bool = False,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
    ) -> None:
        super().__init__(reduction=reduction, get_not_nans=get_not_nans)
        self.ignore_empty = ignore_empty


class PointingGameMetric(_LocalizationMetric):
    """Cumulative :func:`pointing_game` hit rate: ``y_pred`` attribution, ``y`` mask, (B, 1, H, W[, D]) each.

    Args:
        tolerance: dilation radius of the mask in pixels/voxels.
        ignore_empty: empty masks give NaN (skipped by the reduction) instead of raising.
        reduction: MONAI reduction mode for :meth:`aggregate`.
        get_not_nans: also return the non-NaN count from :meth:`aggregate`.
    """

    def __init__(
        self,
        tolerance: int = 0,
        ignore_empty: bool = False,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
    ) -> None:
        super().__init__(ignore_empty=ignore_empty, reduction=reduction, get_not_nans=get_not_nans)
        self.tolerance = tolerance

    def _per_sample(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return pointing_game(y_pred, y, tolerance=self.tolerance, ignore_empty=self.ignore_empty)


class RelevanceMassMetric(_LocalizationMetric):
    """Cumulative :func:`relevance_mass`: ``y_pred`` attribution, ``y`` mask, (B, 1, H, W[, D]) each.

    Args:
        ignore_empty: empty masks give NaN (skipped by the reduction) instead of raising.
        reduction: MONAI reduction mode for :meth:`aggregate`.
        get_not_nans: also return the non-NaN count from :meth:`aggregate`.
    """

    def _per_sample(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return relevance_mass(y_pred, y, ignore_empty=self.ignore_empty)


class RelevanceRankAccuracyMetric(_LocalizationMetric):
    """Cumulative :func:`relevance_rank_accuracy`: ``y_pred`` attribution, ``y`` mask, (B, 1, H, W[, D]) each.

    Args:
        ignore_empty: empty masks give NaN (skipped by the reduction) instead of raising.
        reduction: MONAI reduction mode for :meth:`aggregate`.
        get_not_nans: also return the non-NaN count from :meth:`aggregate`.
    """

    def _per_sample(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return relevance_rank_accuracy(y_pred, y, ignore_empty=self.ignore_empty)
