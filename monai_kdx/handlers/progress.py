"""A progress bar that attaches like a MONAI handler, and an output transform for ignite metrics."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Engine
from ignite.handlers import ProgressBar as _IgniteProgressBar

__all__ = ["ProgressBar", "stacked"]


class ProgressBar:
    """ignite's tqdm progress bar, configured in the constructor so bundle configs can list it.

    MONAI attaches handlers with ``handler.attach(engine)``; ignite's bar takes its options in
    ``attach``. This wrapper takes them up front.

    Args:
        output_transform: maps ``engine.state.output`` to a number or dict shown on the bar, e.g.
            ``monai.handlers.from_engine(['loss'], first=True)``.
        metric_names: engine metrics to show (``"all"`` for every one).
        persist: keep the finished bar on screen.
        desc: the bar's label.
    """

    def __init__(
        self,
        output_transform: Callable[[Any], Any] | None = None,
        metric_names: str | Sequence[str] | None = None,
        persist: bool = False,
        desc: str | None = None,
    ) -> None:
        self.output_transform = output_transform
        self.metric_names = metric_names
        self.bar = _IgniteProgressBar(persist=persist, desc=desc, dynamic_ncols=True)

    def attach(self, engine: Engine) -> None:
        transform = self.output_transform
        self.bar.attach(
            engine,
            metric_names=self.metric_names,
            output_transform=(lambda output: {"loss": transform(output)}) if transform else None,
        )


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
