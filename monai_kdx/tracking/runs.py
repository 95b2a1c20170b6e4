"""Pipeline runs in MLflow: one parent run per pipeline, one child run per stage, through one small object that
owns the MLflow client (:class:`Tracker`).

The bundles' MLflow handlers (:class:`monai_kdx.handlers.MLflowRunHandler`) never start a fluent run: they adopt
the *running* run named ``run_name`` of their experiment, or create one. A pipeline therefore creates each stage's
child run first (tagged ``mlflow.parentRunId``) and passes its name to the bundle as ``run_name``: every handler of
the stage's engines logs into that run.
"""

from __future__ import annotations

import math
import numbers
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["PARENT_TAG", "STAGE_TAG", "Tracker", "artifact_location", "experiment_id"]

PARENT_TAG = "mlflow.parentRunId"
STAGE_TAG = "monai_kdx.stage"
_FINISHED = ("FINISHED", "FAILED", "KILLED")


def artifact_location(tracking_uri: str, experiment_name: str) -> str | None:
    """Where a new experiment's artifacts go: next to an embedded SQLite store (``<store folder>/mlartifacts/<name>``,
    so everything a run writes stays under its output folder, whatever the working directory), or None for a
    tracking server (it decides, e.g. through its artifact proxy)."""
    from urllib.parse import quote

    if not tracking_uri.startswith("sqlite:///"):
        return None
    folder = os.path.dirname(os.path.abspath(tracking_uri[len("sqlite:///") :]))
    return Path(folder, "mlartifacts", quote(experiment_name, safe="")).as_uri()


def experiment_id(tracking_uri: str, experiment_name: str) -> str:
    """The id of an experiment, created if it does not exist (see :meth:`Tracker.experiment_id`)."""
    return Tracker(tracking_uri).experiment_id(experiment_name)


class Tracker:
    """The MLflow client of one tracking store, and what pipelines do with it.

    Args:
        tracking_uri: the MLflow store (``sqlite:///...`` or an ``http(s)`` server).

    Attributes:
        client: the ``MlflowClient`` (for anything else, e.g. ``log_artifact``).
    """

    def __init__(self, tracking_uri: str) -> None:
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)

    def experiment_id(self, experiment_name: str) -> str:
        """The id of an experiment, created if it does not exist (with its artifacts next to an embedded store, see
        :func:`artifact_location`), restored if it was deleted."""
        experiment = self.client.get_experiment_by_name(experiment_name)
        if experiment is None:
            location = artifact_location(self.tracking_uri, experiment_name)
            return self.client.create_experiment(experiment_name, artifact_location=location)
        if experiment.lifecycle_stage == "deleted":
            self.client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id

    def start_parent(
        self,
        experiment_name: str,
        run_name: str = "pipeline",
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> str:
        """Create the parent run of a pipeline (params logged once) and return its id."""
        from mlflow.entities import Param

        run = self.client.create_run(self.experiment_id(experiment_name), run_name=run_name, tags=dict(tags or {}))
        if params:
            self.client.log_batch(run.info.run_id, params=[Param(key, str(value)) for key, value in params.items()])
        return run.info.run_id

    def start_child(self, parent_run_id: str, run_name: str, stage: str | None = None) -> str:
        """Create a child run under ``parent_run_id`` (same experiment), for one stage, and return its id.

        Runs with the same name in the experiment that did not finish (an interrupted attempt) are renamed
        ``"<name> (failed)"`` and marked FAILED first, so a bundle run with ``run_name`` can only pick this one.
        """
        parent = self.client.get_run(parent_run_id)
        experiment = parent.info.experiment_id
        for run in self.client.search_runs([experiment], filter_string=f"attributes.run_name = '{run_name}'"):
            if run.info.status != "FINISHED":
                self.client.update_run(run.info.run_id, name=f"{run_name} (failed)")
                if run.info.status not in _FINISHED:
                    self.client.set_terminated(run.info.run_id, "FAILED")
        tags = {PARENT_TAG: parent_run_id, STAGE_TAG: stage or run_name}
        return self.client.create_run(experiment, run_name=run_name, tags=tags).info.run_id

    def reopen(self, run_id: str) -> None:
        """Set a run back to RUNNING, so the next MLflow handler with its name writes to it (the handlers end their
        run when their engine completes)."""
        self.client.update_run(run_id, status="RUNNING")

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        """Terminate a run with ``status`` (FINISHED, FAILED or KILLED)."""
        self.client.set_terminated(run_id, status)

    def log_metrics(self, run_id: str, values: Mapping[str, Any]) -> int:
        """Log the finite real numbers of ``values`` (name → value; other entries skipped) to a run, at step 0.

        Returns:
            How many metrics were logged.
        """
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(key, float(value), now, 0)
            for key, value in values.items()
            if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        ]
        for start in range(0, len(metrics), 1000):  # MLflow's limit per batch
            self.client.log_batch(run_id, metrics=metrics[start : start + 1000])
        return len(metrics)

    def child_runs(self, parent_run_id: str) -> list[Any]:
        """The runs tagged as children of ``parent_run_id``, oldest first."""
        parent = self.client.get_run(parent_run_id)
        runs = self.client.search_runs(
            [parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=1000
        )
        return sorted(runs, key=lambda run: run.info.start_time)

    def registered_models(self, run_id: str) -> list[dict[str, str]]:
        """The model versions registered from a run: ``{"name", "version", "uri"}``."""
        versions = self.client.search_model_versions(f"run_id = '{run_id}'")
        return [{"name": v.name, "version": str(v.version), "uri": f"models:/{v.name}/{v.version}"} for v in versions]
