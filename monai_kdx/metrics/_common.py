"""Shared ground of the metrics: input validation for (B, 1, *spatial) maps, computation in float32 at least,
per-sample flattening and ranking, Pearson correlation without NaN, and the base class that turns a per-sample
function into a MONAI cumulative metric."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from monai.metrics import CumulativeIterationMetric
from monai.metrics.utils import do_metric_reduction
from monai.utils import MetricReduction

__all__ = [
    "check_map",
    "check_same_shape",
    "check_pair",
    "check_empty_masks",
    "flatten_samples",
    "descending_ranks",
    "average_ranks",
    "safe_divide",
    "is_constant",
    "pearson",
    "MapMetric",
]


def _sample_indices(per_sample: torch.Tensor) -> list[int]:
    """Indices of the samples flagged in a (B,) boolean tensor."""
    return torch.nonzero(per_sample).flatten().tolist()


def check_map(
    x: Any, name: str, *, nonnegative: bool = False, binary: bool = False, single_channel: bool = True
) -> torch.Tensor:
    """Validate one batch of maps and return it as a plain floating tensor.

    Args:
        x: (B, 1, H, W) in 2D or (B, 1, H, W, D) in 3D; a ``MetaTensor`` is accepted (its metadata is dropped),
            integer and boolean tensors are converted to the default floating dtype.
        name: the argument's name, used in error messages.
        nonnegative: reject negative values.
        binary: reject values other than 0 and 1.
        single_channel: require one channel; ``False`` accepts images (B, C, H, W) or (B, C, H, W, D).

    Returns:
        ``x`` as a ``torch.Tensor`` (not a subclass) of a floating dtype, same shape.

    Raises:
        TypeError: ``x`` is not a tensor.
        ValueError: wrong number of dimensions, a channel dimension other than 1, an empty map, NaN or
            infinite values, negative values (``nonnegative``) or non-binary values (``binary``); the message
            names the argument and, for value problems, the offending sample indices.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
    x = x.as_subclass(torch.Tensor)
    if x.ndim not in (4, 5) or (single_channel and x.shape[1] != 1):
        channels = "1" if single_channel else "C"
        raise ValueError(
            f"{name} must have shape (B, {channels}, H, W) (2D) or (B, {channels}, H, W, D) (3D), got {tuple(x.shape)}."
        )
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}).")
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    flat = x.flatten(1)
    bad = ~torch.isfinite(flat).all(dim=1)
    if bad.any():
        raise ValueError(f"{name} contains NaN or infinite values (samples {_sample_indices(bad)}).")
    if nonnegative:
        bad = (flat < 0).any(dim=1)
        if bad.any():
            raise ValueError(f"{name} must be non-negative, found negative values (samples {_sample_indices(bad)}).")
    if binary:
        bad = ((flat != 0) & (flat != 1)).any(dim=1)
        if bad.any():
            raise ValueError(f"{name} must be binary (0/1), found other values (samples {_sample_indices(bad)}).")
    return x


def check_same_shape(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    """Raise ``ValueError`` unless ``a`` and ``b`` have exactly the same shape (no broadcasting)."""
    if a.shape != b.shape:
        raise ValueError(
            f"shape mismatch: {name_a} {tuple(a.shape)} vs {name_b} {tuple(b.shape)} (no broadcasting is done)."
        )


def check_pair(
    a: Any,
    b: Any,
    name_a: str,
    name_b: str,
    *,
    nonnegative_a: bool = False,
    nonnegative_b: bool = False,
    binary_b: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate two batches of maps of identical shape (see :func:`check_map`) and bring them to one dtype of
    float32 at least (see :func:`monai_kdx.networks.float32_or_wider`): half-precision maps are computed in float32.

    Returns:
        ``(a, b)`` as plain tensors of the promoted dtype (float32 or float64), each (B, 1, H, W) or (B, 1, H, W, D).

    Raises:
        TypeError, ValueError: as :func:`check_map` and :func:`check_same_shape`.
    """
    a = check_map(a, name_a, nonnegative=nonnegative_a)
    b = check_map(b, name_b, nonnegative=nonnegative_b, binary=binary_b)
    check_same_shape(a, b, name_a, name_b)
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return a.to(dtype), b.to(dtype)


def check_empty_masks(mask: torch.Tensor, ignore_empty: bool) -> torch.Tensor:
    """Flag the samples of a binary (B, 1, *spatial) mask that contain no foreground.

    Returns:
        (B,) boolean tensor, ``True`` where the mask is empty.

    Raises:
        ValueError: some mask is empty and ``ignore_empty`` is ``False``; the message lists the samples.
    """
    empty = mask.flatten(1).sum(dim=1) == 0
    if empty.any() and not ignore_empty:
        raise ValueError(
            f"mask is empty for samples {_sample_indices(empty)}: localization is undefined without a target "
            "region. Pass ignore_empty=True to get NaN for those samples (MONAI reductions skip NaN)."
        )
    return empty


def flatten_samples(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, *spatial) -> (B, N) with N the number of pixels/voxels per sample."""
    return x.flatten(1)


def descending_ranks(flat: torch.Tensor) -> torch.Tensor:
    """Ordinal rank of every position of (B, N) values, 0 for the largest.

    Ties are broken by position: of equal values, the one with the lower flat index ranks first.

    Returns:
        (B, N) int64 ranks, a permutation of ``0..N-1`` per sample.
    """
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    positions = torch.arange(flat.shape[1], device=flat.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def average_ranks(flat: torch.Tensor) -> torch.Tensor:
    """Ascending ranks of (B, N) values with tied values sharing their average rank (as ``scipy.stats.rankdata``).

    Returns:
        (B, N) ranks in the dtype of ``flat``, starting at 0.
    """
    values, order = torch.sort(flat, dim=1, stable=True)
    new_group = torch.ones_like(values, dtype=torch.bool)
    new_group[:, 1:] = values[:, 1:] != values[:, :-1]
    group = torch.cumsum(new_group.long(), dim=1) - 1  # (B, N) tie-group id of every sorted position
    positions = torch.arange(flat.shape[1], device=flat.device, dtype=flat.dtype).expand_as(values).contiguous()
    first = torch.zeros_like(positions).scatter_reduce(1, group, positions, reduce="amin", include_self=False)
    last = torch.zeros_like(positions).scatter_reduce(1, group, positions, reduce="amax", include_self=False)
    sorted_ranks = torch.gather((first + last) / 2, 1, group)
    return torch.empty_like(sorted_ranks).scatter_(1, order, sorted_ranks)


def safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator`` (broadcast), 0 where the denominator is not positive (never NaN or inf)."""
    valid = denominator > 0
    quotient = numerator / torch.where(valid, denominator, torch.ones_like(denominator))
    return torch.where(valid, quotient, torch.zeros_like(quotient))


def is_constant(flat: torch.Tensor) -> torch.Tensor:
    """(B,) flags of the rows of (B, N) values that are constant (tested exactly, not through a rounded std)."""
    return flat.amax(dim=1) == flat.amin(dim=1)


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each row of two (B, N) tensors; 0 where either row is constant (never NaN)."""
    constant = is_constant(a) | is_constant(b)
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    correlation = safe_divide((a * b).sum(dim=1), torch.sqrt((a * a).sum(dim=1) * (b * b).sum(dim=1)))
    return torch.where(constant, torch.zeros_like(correlation), correlation.clamp(-1.0, 1.0))


class MapMetric(CumulativeIterationMetric):
    """A per-sample map metric as a MONAI cumulative metric (usable with ``IgniteMetricHandler`` and evaluators).

    Subclasses implement :meth:`_per_sample`, which maps ``y_pred`` and ``y`` of shape (B, 1, H, W) or
    (B, 1, H, W, D) to (B,) values; each iteration buffers them as (B, 1) and :meth:`aggregate` reduces the
    buffer with ``do_metric_reduction`` (NaN values are skipped).

    Args:
        reduction: MONAI reduction mode applied in :meth:`aggregate` (``"mean"``, ``"sum"``, ``"none"``, ...).
        get_not_nans: also return the count of non-NaN values from :meth:`aggregate`.
    """

    def __init__(self, reduction: MetricReduction | str = MetricReduction.MEAN, get_not_nans: bool = False) -> None:
        super().__init__()
        self.reduction = reduction
        self.get_not_nans = get_not_nans

    @abstractmethod
    def _per_sample(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B,) metric values of one batch."""

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if y is None:
            raise ValueError(f"{type(self).__name__} needs y (the target map or mask).")
        return self._per_sample(y_pred, y).unsqueeze(1)

    def aggregate(
        self, reduction: MetricReduction | str | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Reduce the buffered (N, 1) per-sample values; ``reduction`` overrides the constructor's."""
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("the data to aggregate must be a PyTorch Tensor.")
        value, not_nans = do_metric_reduction(data, reduction or self.reduction)
        return (value, not_nans) if self.get_not_nans else value
