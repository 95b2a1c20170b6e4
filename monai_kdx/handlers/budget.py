"""Training that stops on its own: on a validation plateau, at the epoch cap or before a wall-time budget is
overrun, with a record of why and when.

With :class:`TrainingStop` on a trainer, a bundle trains as long as its data needs instead of a fixed number of
epochs tuned to one dataset. It writes what happened (epochs run, why it stopped: plateau, cap or budget, the best
validation score and its epoch) to ``engine.state.metrics`` (``epochs_run``, ``stopped_by_*``) and to a JSON file
next to the checkpoints, which the main job's report reads. :class:`FinalEvaluation` runs an evaluator when the
trainer completes, whatever stopped it; :class:`BestWeights` puts the best validated weights back first, for
stages that save the network in memory rather than through a ``CheckpointSaver`` (the pruned network).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import time
from typing import Any

import torch
from ignite.engine import Engine, Events

from monai_kdx.networks import unwrap_network

__all__ = ["STOP_REASONS", "BestWeights", "FinalEvaluation", "TrainingStop", "check_stopping"]

STOP_REASONS = ("plateau", "cap", "budget")


def _is_count(value: Any) -> bool:
    """An integer >= 1 (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_stopping(
    max_epochs: int | None, patience: int | None = None, time_budget: float | None = None, min_epochs: int = 1
) -> None:
    """Refuse stopping settings that cannot work, before any training: an epoch cap below 1, a patience below 1
    or larger than the cap (the plateau could never stop training), a budget that is not a positive number, a
    minimum of epochs below 1. The one check of these settings: the bundles, :class:`TrainingStop` and the main
    job's ``--time-budget`` call it.

    Args:
        max_epochs: the epoch cap (``None``: not checked, e.g. a handler that does not know the trainer's cap).
        patience: epochs without improvement before stopping (``None``: no plateau stop).
        time_budget: seconds (``None``: no budget).
        min_epochs: epochs before the budget may stop training.

    Raises:
        ValueError: naming the setting.
    """
    if max_epochs is not None and not _is_count(max_epochs):
        raise ValueError(f"max_epochs (the epoch cap) must be an integer >= 1, got {max_epochs!r}.")
    if patience is not None:
        if not _is_count(patience):
            raise ValueError(f"patience must be an integer >= 1 (epochs without improvement), got {patience!r}.")
        if max_epochs is not None and patience > max_epochs:
            raise ValueError(
                f"patience {patience} is larger than the epoch cap max_epochs {max_epochs}: the plateau could never "
                "stop training; lower the patience or raise the cap."
            )
    if time_budget is not None and (not isinstance(time_budget, numbers.Real) or isinstance(time_budget, bool)
                                    or not time_budget > 0):
        raise ValueError(f"time_budget: the time budget must be a positive number of seconds or null, got "
                         f"{time_budget!r}.")  # fmt: skip
    if not _is_count(min_epochs):
        raise ValueError(f"min_epochs (before the time budget may stop training) must be an integer >= 1, got "
                         f"{min_epochs!r}.")  # fmt: skip


class TrainingStop:
    """Stop a trainer on a validation plateau or before it would overrun a time budget, and record why it stopped.

    Attach it to the trainer after the ``ValidationHandler`` (it reads the validation of the epoch that just ended).
    At the end of every epoch:

    - plateau: when the validator's key metric (MONAI evaluators track its best value and epoch) has not improved
      for ``patience`` epochs, the trainer terminates;
    - budget: the time of the next epoch is estimated as the longest epoch so far (validation included); when it
      would not fit in what is left of ``seconds``, and ``min_epochs`` have run, the trainer terminates.

    At completion the reason is ``"plateau"``, ``"budget"`` or ``"cap"`` (``max_epochs`` reached, or another handler
    terminated it at the last epoch).

    Args:
        patience: epochs without a better validation score before stopping (``None``: no plateau stop).
        seconds: the wall-time budget of the whole run (``None``: none).
        validator: the evaluator whose key metric decides the plateau and is recorded as the best score (needed
            with ``patience``).
        report_path: a JSON file written at completion (rank 0): ``epochs_run``, ``max_epochs``, ``stop_reason``,
            ``seconds``, ``budget_seconds``, ``patience``, ``min_epochs``, ``best_metric``, ``best_metric_epoch``,
            ``metric_name``.
        min_epochs: the fewest epochs before the budget may stop training (the cap and a plateau may stop it
            earlier): on a machine slower than the budget assumes, training overruns its budget rather than keep
            a model of one epoch (one epoch of the main job's saliency fine-tuning cut the brain student from 0.96
            to 0.78 test accuracy on a machine twice as slow as usual).

    Raises:
        ValueError: a budget that is not a positive number, a patience or ``min_epochs`` below 1, a patience
            without a validator.
    """

    def __init__(
        self,
        patience: int | None = None,
        seconds: float | None = None,
        validator: Engine | None = None,
        report_path: str | None = None,
        min_epochs: int = 1,
    ) -> None:
        check_stopping(None, patience, seconds, min_epochs)
        if patience is not None and validator is None:
            raise ValueError("a patience needs the validator whose key metric it watches.")
        self.patience = patience
        self.seconds = math.inf if seconds is None else float(seconds)
        self.validator = validator
        self.report_path = report_path
        self.min_epochs = min_epochs
        self.report: dict[str, Any] = {}
        self._start = 0.0
        self._epoch_start = 0.0
        self._longest = 0.0
        self._reason: str | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def _started(self, engine: Engine) -> None:
        self._start = time.perf_counter()
        self._longest, self._reason = 0.0, None

    def _epoch_started(self, engine: Engine) -> None:
        self._epoch_start = time.perf_counter()

    def _epoch_completed(self, engine: Engine) -> None:
        now = time.perf_counter()
        self._longest = max(self._longest, now - self._epoch_start)
        epoch = engine.state.epoch
        if epoch >= (engine.state.max_epochs or 0):
            return
        best = getattr(getattr(self.validator, "state", None), "best_metric_epoch", -1)
        if self.patience is not None and best not in (-1, None) and epoch - best >= self.patience:
            self._reason = "plateau"
            engine.logger.info(f"no better validation score for {self.patience} epochs: stopping after epoch {epoch}.")
            engine.terminate()
        elif epoch >= self.min_epochs and now - self._start + self._longest > self.seconds:
            self._reason = "budget"
            engine.logger.info(f"time budget of {self.seconds:.0f} s: stopping after epoch {epoch}.")
            engine.terminate()

    def _completed(self, engine: Engine) -> None:
        epochs = int(engine.state.epoch)
        reason = self._reason or "cap"
        report: dict[str, Any] = {
            "epochs_run": epochs,
            "max_epochs": int(engine.state.max_epochs or 0),
            "stop_reason": reason,
            "seconds": round(time.perf_counter() - self._start, 1),
            "budget_seconds": None if math.isinf(self.seconds) else self.seconds,
            "patience": self.patience,
            "min_epochs": self.min_epochs,
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


class FinalEvaluation:
    """Run an evaluator once when the trainer completes, whenever that is (the epoch cap, a plateau or the time
    budget): e.g. the test split after fine-tuning. Attach it before the trainer's MLflow handler, so the results
    land in the trainer's run before that handler closes it.

    Args:
        evaluator: the engine to run (e.g. ``@test#evaluator``).
    """

    def __init__(self, evaluator: Engine) -> None:
        if not isinstance(evaluator, Engine):
            raise TypeError(f"evaluator must be an ignite Engine, got {type(evaluator).__name__}.")
        self.evaluator = evaluator

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, lambda _: self.evaluator.run())


class BestWeights:
    """Keep the trainer network's weights from its best validation and put them back when training completes.

    After every run of ``validator``, the trainer's network (parameters and buffers) is copied when the
    validator's key metric beats the best so far; at ``Events.COMPLETED`` the copy is loaded back, so handlers
    that run after it (saving the network, a :class:`FinalEvaluation` on the test split) see the best weights, not
    the last epoch's. When the trainer's network is replaced (a pruning step), the record starts over: only
    weights of the network being trained are ever restored.

    Attach it to the trainer before the handlers that use the network at completion.

    Args:
        validator: the MONAI evaluator whose key metric (greater is better) ranks the epochs.

    Example (bundle YAML, first in ``train_handlers``):
        - {_target_: monai_kdx.handlers.BestWeights, validator: "@validate#evaluator"}
    """

    def __init__(self, validator: Engine) -> None:
        if not isinstance(validator, Engine):
            raise TypeError(f"validator must be an ignite Engine, got {type(validator).__name__}.")
        self.validator = validator
        self.best_metric = -math.inf
        self.best_epoch: int | None = None
        self._network: torch.nn.Module | None = None
        self._weights: dict[str, torch.Tensor] | None = None

    def attach(self, engine: Engine) -> None:
        self.validator.add_event_handler(Events.COMPLETED, lambda _: self._validated(engine))
        engine.add_event_handler(Events.COMPLETED, self._restore)

    def _validated(self, engine: Engine) -> None:
        state = self.validator.state
        name = getattr(state, "key_metric_name", None)
        if name is None or name not in state.metrics:
            return
        network = unwrap_network(engine.network)
        if network is not self._network:  # replaced (pruned): a new record
            self._network, self._weights, self.best_metric, self.best_epoch = network, None, -math.inf, None
        value = float(state.metrics[name])
        if value > self.best_metric:
            self.best_metric, self.best_epoch = value, int(engine.state.epoch)
            self._weights = {key: tensor.detach().clone() for key, tensor in network.state_dict().items()}

    def _restore(self, engine: Engine) -> None:
        network = unwrap_network(engine.network)
        if self._weights is None or network is not self._network:
            return  # never validated since the network was last replaced: the last weights are all there is
        network.load_state_dict(self._weights)
        engine.logger.info(f"restored the weights of epoch {self.best_epoch} (best validation {self.best_metric:.4f}).")
