"""Log a trained classifier as an MLflow model into the run of MONAI's ``MLFlowHandler``.

:class:`MLflowModelLogger` does not open a run of its own: when the engine completes, it logs the
model file through the client and into the run of the ``MLFlowHandler`` attached to the same engine
(:func:`monai_kdx.tracking.mlflow_handler_run`), and registers it in the Model Registry. Under DDP the
``MLFlowHandler`` exists on rank 0 only, so the other ranks log nothing. In a bundle::

    model_logger:
      _target_: monai_kdx.handlers.MLflowModelLogger
      path: $os.path.join(@ckpt_dir, 'model.pt')
      builder: "@student_builder"
      registered_model_name: brain_mri_3d_student
    train#trainer#train_handlers: "$@train#handlers + [@model_logger]"
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from ignite.engine import Engine, Events

from monai_kdx.tracking import has_mlflow_handler, log_classifier, mlflow_handler_run

__all__ = ["MLflowModelLogger"]

logger = logging.getLogger(__name__)


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class MLflowModelLogger:
    """At ``Events.COMPLETED``, log ``path`` as an MLflow pyfunc model (no pickled modules) into the
    ``MLFlowHandler``'s run and optionally register it.

    Args:
        path: a :func:`~monai_kdx.pruning.save_pruned` file or a ``CheckpointSaver`` state dict (with ``builder``),
            read when the engine completes (e.g. the best checkpoint ``model.pt``).
        builder: ``{"_target_": "dotted.path", **kwargs}`` building the network of a state-dict checkpoint.
        artifact_path: the model's folder among the run's artifacts.
        registered_model_name: register under this name (``None``: log only).
        input_shape: ``(C, *spatial)`` for the model signature; default: one sample of the engine's last batch.
        image_key: the batch key of the images (for the default ``input_shape``).

    Raises:
        RuntimeError: at ``Events.STARTED`` on rank 0 when no ``MLFlowHandler`` is attached to the engine.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        builder: Mapping[str, Any] | None = None,
        artifact_path: str = "model",
        registered_model_name: str | None = None,
        input_shape: tuple[int, ...] | None = None,
        image_key: str = "image",
    ) -> None:
        self.path = os.fspath(path)
        self.builder = None if builder is None else dict(builder)
        self.artifact_path = artifact_path
        self.registered_model_name = registered_model_name
        self.input_shape = None if input_shape is None else tuple(int(s) for s in input_shape)
        self.image_key = image_key
        self.run: tuple[Any, str] | None = None
        self.logged = None  # the LoggedModel, after COMPLETED

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._remember_run)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._remember_run)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def _remember_run(self, engine: Engine) -> None:
        if engine.state.epoch <= 1 and engine.state.iteration == 0 and not has_mlflow_handler(engine) and _is_rank0():
            raise RuntimeError(
                "MLflowModelLogger logs into the run of an MLFlowHandler on the same engine; none is attached."
            )
        # MONAI's handler ends its run (cur_run = None) at COMPLETED, possibly before this handler runs
        self.run = mlflow_handler_run(engine) or self.run

    def completed(self, engine: Engine) -> None:
        """Log (and register) the model into the remembered run; nothing on ranks without an ``MLFlowHandler``."""
        run = mlflow_handler_run(engine) or self.run
        if run is None:
            return
        shape = self.input_shape
        batch = getattr(engine.state, "batch", None)
        if shape is None and isinstance(batch, Mapping) and self.image_key in batch:
            shape = tuple(batch[self.image_key].shape[1:])
        client, run_id = run
        self.logged = log_classifier(
            client,
            run_id,
            self.path,
            builder=self.builder,
            artifact_path=self.artifact_path,
            registered_model_name=self.registered_model_name,
            input_shape=shape,
        )
        logger.info(f"logged {self.path} as {self.logged.model_uri} ({self.logged.registry_uri or 'not registered'})")
