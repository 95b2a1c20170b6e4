"""MLflow from engines: :class:`MLflowRunHandler`, MONAI's ``MLFlowHandler`` made safe for repeated and failing
runs, and :class:`MLflowModelLogger`, which logs a trained classifier as an MLflow model into that handler's run.

:class:`MLflowRunHandler` publishes its run on the engine's state (``engine.state.mlflow_run``: the client and run
id), so other handlers find it through ignite's public API. :class:`MLflowModelLogger` does not open a run of its
own: when the engine completes, it logs the model file into that run and registers it in the Model Registry. Under
DDP the run handler exists on rank 0 only, so the other ranks log nothing. In a bundle::

    model_logger:
      _target_: monai_kdx.handlers.MLflowModelLogger
      path: $os.path.join(@ckpt_dir, 'model.pt')
      builder: "@student_def"  # the plain spec {network: ShallowCNN, ...} that rebuilds the state dict
      registered_model_name: brain_mri_3d_student
    train#trainer#train_handlers: "$@train#handlers + [@model_logger]"
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from ignite.engine import Engine, Events
from monai.engines import Trainer
from monai.handlers import MLFlowHandler

from monai_kdx.tracking import experiment_id, log_classifier

__all__ = ["MLflowRunHandler", "MLflowModelLogger", "RUN_STATE"]

RUN_STATE = "mlflow_run"
"""The ``engine.state`` attribute where :class:`MLflowRunHandler` publishes ``(client, run_id)``."""

_ACTIVE = "RUNNING"


class MLflowRunHandler(MLFlowHandler):
    """MONAI's ``MLFlowHandler`` (same arguments) with three guarantees for runs that are repeated or fail:

    - it logs only into a *running* run named ``run_name`` (e.g. the stage run a pipeline created) or a new one:
      never into a finished, failed or killed run (MONAI's handler adopts any run that is not FINISHED, so a failed
      attempt and the next one would share a run);
    - when the engine raises, its run is marked FAILED (and the exception goes on), so no later run adopts it;
      with ``close_on_complete`` the run closes after every other ``COMPLETED`` handler, so one that fails there
      (e.g. :class:`MLflowModelLogger` refusing a stale file) fails the run too;
    - a new experiment keeps its artifacts next to an embedded SQLite store
      (:func:`monai_kdx.tracking.artifact_location`), not in ``./mlruns`` of the working directory.

    Its run is published as ``engine.state.mlflow_run = (client, run_id)`` for other handlers
    (:class:`MLflowModelLogger`).
    """

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        if not engine.has_event_handler(self._failed, Events.EXCEPTION_RAISED):
            engine.add_event_handler(Events.EXCEPTION_RAISED, self._failed)

    def start(self, engine: Engine) -> None:
        if self.experiment_name and self.cur_run is None:
            # created with its artifact location next to an embedded store
            experiment = experiment_id(self.client.tracking_uri, self.experiment_name)
            if self.run_name is not None:
                runs = self.client.search_runs(
                    [experiment], filter_string=f"attributes.run_name = '{self.run_name}'", order_by=["start_time DESC"]
                )
                active = [run for run in runs if run.info.status == _ACTIVE]
                self.cur_run = (
                    self.client.get_run(active[0].info.run_id)
                    if active
                    else self.client.create_run(experiment_id=experiment, run_name=self.run_name)
                )
        if not isinstance(engine, Trainer):  # MONAI logs max_epochs and epoch_length: they define training runs only
            self.default_tracking_params = []
        if self.close_on_complete and engine.has_event_handler(self.close, Events.COMPLETED):
            engine.remove_event_handler(self.close, Events.COMPLETED)  # re-added last: closes after the others
            engine.add_event_handler(Events.COMPLETED, self.close)
        super().start(engine)
        setattr(engine.state, RUN_STATE, (self.client, self.cur_run.info.run_id))

    def complete(self) -> None:
        """Log the ``artifacts`` into the run: a file at the top, a folder's files with its subfolders kept (MONAI's
        handler puts every file of every folder at the top)."""
        if not (self.artifacts and self.cur_run):
            return
        run_id = self.cur_run.info.run_id
        for path in self.artifacts:
            if path and os.path.isfile(path):
                self.client.log_artifact(run_id, path)
            elif path and os.path.isdir(path):
                self.client.log_artifacts(run_id, path)

    def _failed(self, engine: Engine, error: BaseException) -> None:
        if self.cur_run is not None:
            self.client.set_terminated(self.cur_run.info.run_id, "FAILED")
            self.cur_run = None
        raise error



logger = logging.getLogger(__name__)


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class MLflowModelLogger:
    """At ``Events.COMPLETED``, log ``path`` as an MLflow logged model (pyfunc, no pickled modules) of the run of
    the engine's :class:`MLflowRunHandler` (:func:`monai_kdx.tracking.log_classifier`) and optionally register it.

    Args:
        path: a :func:`~monai_kdx.pruning.save_pruned` file or a ``CheckpointSaver`` state dict (with ``builder``),
            read when the engine completes (e.g. the best checkpoint ``model.pt``).
        builder: the network spec (``{"network": <registered name>, **arguments}``) of a state-dict checkpoint.
        artifact_path: the logged model's name (e.g. ``"student_model"``).
        registered_model_name: register under this name (``None``: log only).
        description: what the model is, for people (the registered model's and version's description).
        tags: tags of the logged model and its registered version (e.g. ``{"role": "student"}``).
        input_shape: ``(C, *spatial)`` for the model signature and input example; default: one sample of the
            engine's first batch.
        image_key: the batch key of the images (for the default ``input_shape``).

    Raises:
        RuntimeError: before the first iteration, on rank 0, when no :class:`MLflowRunHandler` has published its run
            on the engine.
        FileNotFoundError: at completion, ``path`` does not exist, or was last written before the engine started
            (a stale file of an earlier run is never logged).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        builder: Mapping[str, Any] | None = None,
        artifact_path: str = "model",
        registered_model_name: str | None = None,
        input_shape: tuple[int, ...] | None = None,
        image_key: str = "image",
        description: str | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.builder = None if builder is None else dict(builder)
        self.artifact_path = artifact_path
        self.registered_model_name = registered_model_name
        self.input_shape = None if input_shape is None else tuple(int(s) for s in input_shape)
        self.image_key = image_key
        self.description = description
        self.tags = dict(tags or {})
        self.run: tuple[Any, str] | None = None
        self.started: float | None = None  # when the engine started: older files are not this run's
        self.logged = None  # the LoggedModel, after COMPLETED

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._remember_start)
        # the first iteration starts after every STARTED handler: the run handler has published its run by then
        engine.add_event_handler(Events.ITERATION_STARTED(once=1), self._remember_run)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._remember_run)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def _remember_start(self, engine: Engine) -> None:
        self.started = time.time()

    def check_written_by_this_run(self) -> None:
        """Refuse a missing file, or one last written before the engine started (one line naming it)."""
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"MLflowModelLogger: {self.path} was not written by this run (no such file).")
        modified = os.path.getmtime(self.path)
        if self.started is not None and modified < self.started - 1.0:  # 1 s: file systems with coarse clocks
            raise FileNotFoundError(
                f"MLflowModelLogger: {self.path} was not written by this run (last written "
                f"{time.ctime(modified)}, before the run started {time.ctime(self.started)}); nothing is logged."
            )

    def _remember_run(self, engine: Engine) -> None:
        batch = getattr(engine.state, "batch", None)
        if self.input_shape is None and isinstance(batch, Mapping) and self.image_key in batch:
            self.input_shape = tuple(int(size) for size in batch[self.image_key].shape[1:])  # one sample's
        self.run = getattr(engine.state, RUN_STATE, None) or self.run
        if self.run is None and _is_rank0():
            raise RuntimeError(
                "MLflowModelLogger logs into the run of an MLflowRunHandler attached to the same engine; none is "
                "attached (or it has not started its run)."
            )

    def completed(self, engine: Engine) -> None:
        """Log (and register) the model into the run handler's run; nothing on ranks without one."""
        run = getattr(engine.state, RUN_STATE, None) or self.run
        if run is None:
            return
        self.check_written_by_this_run()
        client, run_id = run
        self.logged = log_classifier(
            client,
            run_id,
            self.path,
            builder=self.builder,
            artifact_path=self.artifact_path,
            registered_model_name=self.registered_model_name,
            input_shape=self.input_shape,
            description=self.description,
            tags=self.tags,
        )
        logger.info(f"logged {self.path} as {self.logged.model_uri} ({self.logged.registry_uri or 'not registered'})")
