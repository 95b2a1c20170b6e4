"""Output transforms: from a MONAI engine's (decollated) output to what metrics and loggers need."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["stacked", "scalars", "column", "mean_of"]


def stacked(keys: str | Sequence[str]) -> Callable[[Any], tuple[torch.Tensor, ...]]:
    """An output transform returning batched tensors for ``keys`` from an engine output.

    MONAI engines decollate their output into a list of per-sample dicts; ignite metrics such as
    ``Accuracy`` need batched tensors: ``pred`` (B, C) and ``label`` (B,).

    Args:
        keys: the keys to extract, in order.

    Returns:
        A function ``output -> tuple of tensors`` (stacked along a new batch dimension).
    """
    keys = [keys] if isinstance(keys, str) else list(keys)

    def transform(output: Any) -> tuple[torch.Tensor, ...]:
        if isinstance(output, Mapping):
            return tuple(torch.as_tensor(output[key]) for key in keys)
        return tuple(torch.stack([torch.as_tensor(item[key]) for item in output]) for key in keys)

    return transform


def scalars(keys: str | Sequence[str], prefix: str = "") -> Callable[[Any], dict[str, float]]:
    """An output transform returning ``{prefix + key: float}`` for scalar entries of an engine output,
    e.g. the parts of a distillation loss, so ``MLFlowHandler``/``StatsHandler`` log each one.

    Args:
        keys: output keys holding scalars (per batch; after decollation, every item holds the same value).
        prefix: prepended to each metric name (e.g. ``"train_"``).
    """
    keys = [keys] if isinstance(keys, str) else list(keys)

    def transform(output: Any) -> dict[str, float]:
        first = output if isinstance(output, Mapping) else output[0]
        return {f"{prefix}{key}": float(torch.as_tensor(first[key]).detach()) for key in keys}

    return transform


def column(key: str) -> Callable[[Any], torch.Tensor]:
    """An output transform giving the per-sample values of ``key`` as a (B, 1) column, e.g. for ignite's
    ``Average`` over the samples of an evaluation (``column("cam_deletion_auc")``)."""
    extract = stacked(key)

    def transform(output: Any) -> torch.Tensor:
        return extract(output)[0].reshape(-1, 1)

    return transform


def mean_of(key: str) -> Any:
    """A MONAI ``IgniteMetricHandler`` averaging the per-sample scalar ``key`` of an evaluator's output over the
    evaluation, NaN skipped (:class:`monai_kdx.metrics.MeanMetric`): e.g. ``"$monai_kdx.handlers.mean_of(
    'cam_pointing_game')"`` in a bundle's ``additional_metrics``."""
    from monai.handlers import IgniteMetricHandler

    from monai_kdx.metrics import MeanMetric

    values = column(key)
    return IgniteMetricHandler(metric_fn=MeanMetric(), output_transform=lambda output: (values(output), None))
