"""A progress bar that attaches like a MONAI handler."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ignite.engine import Engine
from ignite.handlers import ProgressBar as _IgniteProgressBar

__all__ = ["ProgressBar"]


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

    The bar is drawn only when its stream (standard error) is a terminal.
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
        # drawn on a terminal only (``disable=None``): in a log file a redrawn bar is noise
        self.bar = _IgniteProgressBar(persist=persist, desc=desc, dynamic_ncols=True, disable=None)

    def attach(self, engine: Engine) -> None:
        transform = self.output_transform
        self.bar.attach(
            engine,
            metric_names=self.metric_names,
            output_transform=(lambda output: {"loss": transform(output)}) if transform else None,
        )
