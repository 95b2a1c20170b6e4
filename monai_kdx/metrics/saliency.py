"""Saliency metrics that compare a model's saliency map with a human reference (radiologists' eye-gaze
density or fixations), with the definitions of Bylinskii et al., "What do different evaluation metrics tell
us about saliency models?" (TPAMI 2019): KL divergence, Pearson correlation (CC), similarity (SIM),
normalized scanpath saliency (NSS) and AUC-Judd.

Every function takes (B, 1, H, W) maps in 2D or (B, 1, H, W, D) in 3D of any floating dtype and returns one
value per sample, (B,), computed in float32 (float64 for float64 maps): float16 and bfloat16 maps are converted
first, since their sums over a map overflow or lose all precision. Each has a MONAI cumulative metric class
(``y_pred`` = saliency, ``y`` = target or fixation map) for ``IgniteMetricHandler`` and evaluators.

Degenerate inputs give defined values in the functions, never NaN:

==========================  =====  =====  =====  =====  ========
case                        KL     CC     SIM    NSS    AUC-Judd
==========================  =====  =====  =====  =====  ========
constant saliency           (1)    0      (1)    0      0.5
all-zero target/fixations   0      0      0      0      0.5
every position fixated      n/a    n/a    n/a    0      0.5
==========================  =====  =====  =====  =====  ========

(1) a constant (including all-zero) saliency map is the uniform distribution for KL and SIM, so the value
is the divergence/similarity of the target to uniform.

The cumulative metric classes differ in one case: a sample whose target or fixation map is all zeros has no
distribution (or no fixation) to compare with, so they give NaN for it, which MONAI's reductions skip (its
``not_nans`` count excludes it), as the localization metrics do for empty masks with ``ignore_empty=True``.
Averaging those samples in as 0 (or 0.5) would pull the mean toward a value no map earned.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from monai.utils import MetricReduction

from ._common import MapMetric, check_pair, flatten_samples, is_constant, pearson, safe_divide

__all__ = [
    "SALIENCY_EPS",
    "saliency_kl",
    "saliency_cc",
    "saliency_sim",
    "saliency_nss",
    "saliency_auc_judd",
    "SaliencyKLMetric",
    "SaliencyCCMetric",
    "SaliencySIMMetric",
    "SaliencyNSSMetric",
    "SaliencyAUCJuddMetric",
]

SALIENCY_EPS = 1e-7
"""Regularization constant of :func:`saliency_kl` (large enough to matter in float32, unlike MATLAB's 2.2e-16)."""


def _check_eps(eps: Any) -> float:
    """``eps`` as a float, refusing anything but a finite number > 0 (0 gives log(0) = -inf for empty positions)."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}.")
    return float(eps)


def _as_distribution(flat: torch.Tensor) -> torch.Tensor:
    """Normalize each row of non-negative (B, N) values to sum 1; an all-zero row becomes uniform."""
    total = flat.sum(dim=1, keepdim=True)
    return torch.where(total > 0, safe_divide(flat, total), torch.full_like(flat, 1.0 / flat.shape[1]))


def _distributions(saliency: Any, target_map: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validated, sum-normalized (B, N) saliency and target, and the (B,) flag of all-zero targets."""
    saliency, target_map = check_pair(
        saliency, target_map, "saliency", "target_map", nonnegative_a=True, nonnegative_b=True
    )
    flat_target = flatten_samples(target_map)
    empty = flat_target.sum(dim=1) == 0
    return _as_distribution(flatten_samples(saliency)), _as_distribution(flat_target), empty


def saliency_kl(saliency: Any, target_map: Any, eps: float = SALIENCY_EPS) -> torch.Tensor:
    """Kullback-Leibler divergence of the saliency from the target map (lower is better).

    With both maps normalized to sum 1 per sample (S: saliency, G: target),
    ``KL = sum_i G_i * log(eps + G_i / (S_i + eps))``.

    Args:
        saliency: non-negative (B, 1, H, W) or (B, 1, H, W, D); a constant map counts as uniform.
        target_map: non-negative reference density (e.g. gaze), same shape.
        eps: regularization constant, a finite number > 0, default :data:`SALIENCY_EPS` = 1e-7.

    Returns:
        (B,) divergences; 0 for an all-zero target map (no distribution to diverge from; :class:`SaliencyKLMetric`
        gives NaN there instead).

    Raises:
        TypeError: a non-tensor input.
        ValueError: wrong shape or ndim, shape mismatch, NaN/inf or negative values, ``eps`` not a finite number > 0.
    """
    eps = _check_eps(eps)
    s, g, empty = _distributions(saliency, target_map)
    kl = (g * torch.log(eps + g / (s + eps))).sum(dim=1)
    return torch.where(empty, torch.zeros_like(kl), kl)


def saliency_sim(saliency: Any, target_map: Any) -> torch.Tensor:
    """Similarity (histogram intersection) ``sum_i min(S_i, G_i)`` of the sum-normalized maps, in [0, 1].

    Args:
        saliency: non-negative (B, 1, H, W) or (B, 1, H, W, D); a constant map counts as uniform.
        target_map: non-negative reference density, same shape.

    Returns:
        (B,) similarities; 0 for an all-zero target map (:class:`SaliencySIMMetric` gives NaN there instead).

    Raises:
        TypeError: a non-tensor input.
        ValueError: wrong shape or ndim, shape mismatch, NaN/inf or negative values.
    """
    s, g, empty = _distributions(saliency, target_map)
    sim = torch.minimum(s, g).sum(dim=1)
    return torch.where(empty, torch.zeros_like(sim), sim)


def saliency_cc(saliency: Any, target_map: Any) -> torch.Tensor:
    """Pearson correlation coefficient between saliency and target map, in [-1, 1].

    Args:
        saliency: (B, 1, H, W) or (B, 1, H, W, D), any real values.
        target_map: non-negative reference density, same shape.

    Returns:
        (B,) correlations; 0 when either map is constant, which includes an all-zero target
        (:class:`SaliencyCCMetric` gives NaN for an all-zero target instead).

    Raises:
        TypeError: a non-tensor input.
        ValueError: wrong shape or ndim, shape mismatch, NaN/inf values, a negative target.
    """
    saliency, target_map = check_pair(saliency, target_map, "saliency", "target_map", nonnegative_b=True)
    return pearson(flatten_samples(saliency), flatten_samples(target_map))


def saliency_nss(saliency: Any, fixation_map: Any) -> torch.Tensor:
    """Normalized scanpath saliency: the mean of the z-scored saliency at the fixated positions.

    The z-score uses the population standard deviation of each sample's map (``ddof=0``).

    Args:
        saliency: (B, 1, H, W) or (B, 1, H, W, D), any real values.
        fixation_map: binary (0/1, bool or integer accepted) fixations, same shape.

    Returns:
        (B,) NSS values; 0 for a constant saliency map or an empty fixation map (:class:`SaliencyNSSMetric`
        gives NaN for an empty fixation map instead).

    Raises:
        TypeError: a non-tensor input.
        ValueError: wrong shape or ndim, shape mismatch, NaN/inf values, a non-binary fixation map.
    """
    saliency, fixation_map = check_pair(saliency, fixation_map, "saliency", "fixation_map", binary_b=True)
    s, f = flatten_samples(saliency), flatten_samples(fixation_map)
    centered = s - s.mean(dim=1, keepdim=True)
    std = centered.pow(2).mean(dim=1, keepdim=True).sqrt()
    nss = safe_divide((safe_divide(centered, std) * f).sum(dim=1), f.sum(dim=1))
    return torch.where(is_constant(s), torch.zeros_like(nss), nss)


def saliency_auc_judd(saliency: Any, fixation_map: Any) -> torch.Tensor:
    """AUC-Judd: area under the ROC curve whose thresholds are the saliency values at the fixations.

    For each threshold t (every fixated saliency value), the true-positive rate is the fraction of fixated
    positions with saliency >= t and the false-positive rate the fraction of non-fixated positions with
    saliency >= t; the points (0, 0) and (1, 1) are added and the area is taken with the trapezoid rule.
    Tied values are counted as they are (no random jitter as in the MIT benchmark code), so the result is
    deterministic.

    Args:
        saliency: (B, 1, H, W) or (B, 1, H, W, D), any real values.
        fixation_map: binary (0/1, bool or integer accepted) fixations, same shape.

    Returns:
        (B,) AUC values in [0, 1]; 0.5 for a constant saliency map, an empty fixation map, or a fixation
        map that covers every position (no negatives to rank against); :class:`SaliencyAUCJuddMetric` gives NaN
        for an empty fixation map instead.

    Raises:
        TypeError: a non-tensor input.
        ValueError: wrong shape or ndim, shape mismatch, NaN/inf values, a non-binary fixation map.
    """
    saliency, fixation_map = check_pair(saliency, fixation_map, "saliency", "fixation_map", binary_b=True)
    s, fixated = flatten_samples(saliency), flatten_samples(fixation_map) > 0
    n_fix = fixated.sum(dim=1, keepdim=True)
    n_other = fixated.shape[1] - n_fix
    minus_inf = torch.full_like(s, -torch.inf)
    fixated_values = torch.where(fixated, s, minus_inf).sort(dim=1).values  # ascending, -inf at non-fixations
    other_values = torch.where(fixated, minus_inf, s).sort(dim=1).values
    thresholds = fixated_values.flip(1)  # descending; the first n_fix entries are the real thresholds
    length = s.shape[1]
    # counts of values >= t among the finite entries of an ascending row = length - (index of first value >= t)
    fix_above = length - torch.searchsorted(fixated_values, thresholds, side="left")
    other_above = length - torch.searchsorted(other_values, thresholds, side="left")
    is_threshold = torch.isfinite(thresholds)
    tp = torch.where(is_threshold, safe_divide(fix_above.to(s.dtype), n_fix), torch.ones_like(s))
    fp = torch.where(is_threshold, safe_divide(other_above.to(s.dtype), n_other), torch.ones_like(s))
    zeros, ones = torch.zeros_like(s[:, :1]), torch.ones_like(s[:, :1])
    tp, fp = torch.cat([zeros, tp, ones], dim=1), torch.cat([zeros, fp, ones], dim=1)
    auc = torch.trapezoid(tp, fp, dim=1)
    degenerate = ((n_fix == 0) | (n_other == 0)).squeeze(1)
    return torch.where(degenerate, torch.full_like(auc, 0.5), auc)


class _SaliencyMetric(MapMetric):
    """A saliency metric whose samples with an all-zero reference map (``y``) are NaN, skipped by the reduction."""

    def _metric(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B,) values of the functional form."""
        raise NotImplementedError

    def _per_sample(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        values = self._metric(y_pred, y)  # validates both maps first
        empty = ~(y.as_subclass(torch.Tensor).flatten(1) != 0).any(dim=1).to(values.device)
        return torch.where(empty, torch.full_like(values, torch.nan), values)


class SaliencyKLMetric(_SaliencyMetric):
    """Cumulative :func:`saliency_kl`: ``y_pred`` saliency, ``y`` target density, (B, 1, H, W[, D]) each.

    A sample with an all-zero target map gives NaN (skipped by the reduction, not counted in ``not_nans``).

    Args:
        eps: regularization constant of the divergence.
        reduction: MONAI reduction mode for :meth:`aggregate`.
        get_not_nans: also return the non-NaN count from :meth:`aggregate`.
    """

    def __init__(
        self,
        eps: float = SALIENCY_EPS,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
    ) -> None:
        super().__init__(reduction=reduction, get_not_nans=get_not_nans)
        self.eps = _check_eps(eps)

    def _metric(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return saliency_kl(y_pred, y, eps=self.eps)


class SaliencyCCMetric(_SaliencyMetric):
    """Cumulative :func:`saliency_cc`: ``y_pred`` saliency, ``y`` target density, (B, 1, H, W[, D]) each.

    A sample with an all-zero target map gives NaN (skipped by the reduction, not counted in ``not_nans``).
    """

    def _metric(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return saliency_cc(y_pred, y)


class SaliencySIMMetric(_SaliencyMetric):
    """Cumulative :func:`saliency_sim`: ``y_pred`` saliency, ``y`` target density, (B, 1, H, W[, D]) each.

    A sample with an all-zero target map gives NaN (skipped by the reduction, not counted in ``not_nans``).
    """

    def _metric(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return saliency_sim(y_pred, y)


class SaliencyNSSMetric(_SaliencyMetric):
    """Cumulative :func:`saliency_nss`: ``y_pred`` saliency, ``y`` binary fixations, (B, 1, H, W[, D]) each.

    A sample with an empty fixation map gives NaN (skipped by the reduction, not counted in ``not_nans``).
    """

    def _metric(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return saliency_nss(y_pred, y)


class SaliencyAUCJuddMetric(_SaliencyMetric):
    """Cumulative :func:`saliency_auc_judd`: ``y_pred`` saliency, ``y`` binary fixations, (B, 1, H, W[, D]) each.

    A sample with an empty fixation map gives NaN (skipped by the reduction, not counted in ``not_nans``).
    """

    def _metric(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return saliency_auc_judd(y_pred, y)
