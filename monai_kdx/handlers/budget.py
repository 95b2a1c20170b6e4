"""Training that stops on its own: a wall-time budget and a record of why and when training stopped.

With MONAI's ``EarlyStopHandler`` on the validation metric (a plateau), ``max_epochs`` as a cap and
:class:`TrainingBudget` for the wall time, a bundle trains as long as its data needs instead of a fixed number of
epochs tuned to one dataset. :class:`TrainingBudget` also writes what happened (epochs run, why it stopped: plateau,
cap or budget, the best validation score and its epoch) to ``engine.state.metrics`` (logged by MLflow handlers as
``epochs_run``, ``stopped_by_*``, ``best_*``) and to a JSON file next to the checkpoints, which the main job's
report reads.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

from ignite.engine import Engine, Events

__all__ = ["STOP_REASONS", "TrainingBudget"]

STOP_REASONS = ("plateau", "cap", "budget")


class TrainingBudget:
    """Stop a trainer before it would overrun ``seconds``, and record why training stopped.

    At the end of every epoch the time of the next epoch is estimated as the longest epoch so far (validation
    included); when it would not fit in what is left of the budget, the trainer terminates. At completion the
    reason is ``"budget"`` (this handler stopped it), ``"cap"`` (``max_epochs`` reached) or ``"plateau"`` (another
    handler, e.g. MONAI's ``EarlyStopHandler``, terminated it).

    Args:
        seconds: the wall-time budget of the whole run (``None`` or ``inf``: none, the reason is recorded only).
        validator: the evaluator whose key metric is recorded as the best score (optional).
        report_path: a JSON file written at completion (rank 0): ``epochs_run``, ``max_epochs``, ``stop_reason``,
            ``seconds``, ``budget_seconds``, ``best_metric``, ``best_metric_epoch``, ``metric_name``.

    Raises:
        ValueError: a budget that is not a positive number.
    """

    def __init__(self, seconds: float | None = None, validator: Engine | None = None, report_path: str | None = None):
        if seconds is not None and (isinstance(seconds, bool) or not float(seconds) > 0):
            raise ValueError(f"the time budget must be a positive number of seconds, got {seconds!r}.")
        self.seconds = math.inf if seconds is None else float(seconds)
        self.validator = validator
        self.report_path = report_path
        self.report: dict[str, Any] = {}
        self._start = 0.0
        self._epoch_start = 0.0
        self._longest = 0.0
        self._stopped_here = False

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def _started(self, engine: Engine) -> None:
        self._start = time.perf_counter()
        self._longest, self._stopped_here = 0.0, False

    def _epoch_started(self, engine: Engine) -> None:
        self._epoch_start = time.perf_counter()

    def _epoch_completed(self, engine: Engine) -> None:
        now = time.perf_counter()
        self._longest = max(self._longest, now - self._epoch_start)
        last = engine.state.epoch >= (engine.state.max_epochs or 0)
        if not last and now - self._start + self._longest > self.seconds:
            self._stopped_here = True
            engine.logger.info(f"time budget of {self.seconds:.0f} s: stopping after epoch {engine.state.epoch}.")
            engine.terminate()

    def _completed(self, engine: Engine) -> None:
        epochs = int(engine.state.epoch)
        if self._stopped_here:
            reason = "budget"
        elif epochs >= (engine.state.max_epochs or 0):
            reason = "cap"
        else:
            reason = "plateau"
        report: dict[str, Any] = {
            "epochs_run": epochs,
            "max_epochs": int(engine.state.max_epochs or 0),
            "stop_reason": reason,
            "seconds": round(time.perf_counter() - self._start, 1),
            "budget_seconds": None if math.isinf(self.seconds) else self.seconds,
        }
        state = getattr(self.validator, "state", None)
        if state is not None and getattr(state, "best_metric_epoch", -1) not in (-1, None):
            report.update(
                best_metric=float(state.best_metric),
                best_metric_epoch=int(state.best_metric_epoch),
                metric_name=getattr(state, "key_metric_name", None),
            )
        self.report = report
        engine.state.metrics.update(
            {"epochs_run": float(epochs), **{f"stopped_by_{name}": float(name == reason) for name in STOP_REASONS}}
        )
        if self.report_path is not None and _is_rank0():
            os.makedirs(os.path.dirname(os.path.abspath(self.report_path)), exist_ok=True)
            temporary = f"{self.report_path}.tmp"
            with open(temporary, "w") as stream:
                json.dump(report, stream, indent=2)
            os.replace(temporary, self.report_path)


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
