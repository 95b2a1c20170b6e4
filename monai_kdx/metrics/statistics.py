"""Statistics of per-sample scores: a NaN-skipping mean as a MONAI metric, and bootstrap confidence intervals.

Small test splits lie: a pointing game of 0.85 on 40 volumes is compatible with anything from about 0.73 to 0.95.
Every figure of the main job's report comes with its 95% percentile-bootstrap interval over the cases it was
computed on (:func:`bootstrap_interval`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from monai.utils import MetricReduction

from ._common import MapMetric

__all__ = ["MeanMetric", "bootstrap_interval"]


class MeanMetric(MapMetric):
    """The mean of per-sample scalar scores over an evaluation, NaN skipped (e.g. a faithfulness score computed on
    a subset of the cases, or a localization score undefined for lesion-free cases).

    ``y_pred`` is (B, 1) (or (B,)); ``y`` is ignored. Use it with MONAI's ``IgniteMetricHandler`` and an output
    transform returning ``(column, None)``.
    """

    def __init__(self, reduction: MetricReduction | str = MetricReduction.MEAN, get_not_nans: bool = False) -> None:
        super().__init__(reduction=reduction, get_not_nans=get_not_nans)

    def _per_sample(self, y_pred: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return torch.as_tensor(y_pred, dtype=torch.float32).reshape(-1)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        return self._per_sample(y_pred, y).unsqueeze(1)


def bootstrap_interval(
    values: Sequence[float] | np.ndarray,
    statistic: Callable[[np.ndarray], float] = np.mean,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """The percentile-bootstrap confidence interval of ``statistic`` over the finite ``values`` (NaN dropped).

    Args:
        values: per-case scores (e.g. 0/1 hits, correlations).
        statistic: reduces an array of values to one number (default: the mean).
        confidence: the interval's coverage, in (0, 1).
        n_resamples: bootstrap resamples (with replacement, as many values as there are).
        seed: the resampling seed (the same values give the same interval).

    Returns:
        ``{"value", "low", "high", "n"}``: the statistic of the values, the interval, the number of finite values
        (``value``, ``low``, ``high`` NaN when there is none).

    Raises:
        ValueError: ``confidence`` outside (0, 1) or ``n_resamples`` < 1.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}.")
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    array = array[np.isfinite(array)]
    if array.size == 0:
        return {"value": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    rng = np.random.default_rng(seed)
    resampled = rng.choice(array, size=(n_resamples, array.size), replace=True)
    statistics = np.array([statistic(row) for row in resampled]) if statistic is not np.mean else resampled.mean(1)
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(statistics, [tail, 1.0 - tail])
    return {"value": float(statistic(array)), "low": float(low), "high": float(high), "n": int(array.size)}
