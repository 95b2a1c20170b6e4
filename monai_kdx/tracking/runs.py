"""Pipeline runs in MLflow: one parent run per pipeline, one child run per stage, and the run that
MONAI's ``MLFlowHandler`` writes to, found on an engine, so everything a stage produces lands there.

MONAI's handler never starts a fluent run: it creates (or reuses) a run through its own
``MlflowClient``, looked up by ``run_name`` among the experiment's runs that are not finished. A
pipeline therefore creates each stage's child run first (tagged ``mlflow.parentRunId``) and passes its
name to the bundle as ``run_name``: every ``MLFlowHandler`` of the stage's engines picks that run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "artifact_location",
    "PARENT_TAG",
    "STAGE_TAG",
    "experiment_id",
    "start_parent_run",
    "start_child_run",
    "reopen_run",
    "end_run",
    "child_runs",
    "log_metrics",
]

PARENT_TAG = "mlflow.parentRunId"
STAGE_TAG = "monai_kdx.stage"
_FINISHED = ("FINISHED", "FAILED", "KILLED")


def _client(tracking_uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


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
    """The id of an experiment, created if it does not exist (with its artifacts next to an embedded store, see
    :func:`artifact_location`)."""
    client = _client(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return client.create_experiment(
            experiment_name, artifact_location=artifact_location(tracking_uri, experiment_name)
        )
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def _close_stale_runs(client: Any, experiment: str, run_name: str) -> None:
    """Rename runs named ``run_name`` that did not finish (an interrupted or failed attempt) to
    ``"<run_name> (failed)"`` and mark them FAILED: MONAI's handler picks the oldest run with its name
    whose status is not FINISHED, so only the run created next may carry the name."""
    for run in client.search_runs([experiment], filter_string=f"attributes.run_name = '{run_name}'"):
        if run.info.status != "FINISHED":
            client.update_run(run.info.run_id, name=f"{run_name} (failed)")
            if run.info.status not in _FINISHED:
                client.set_terminated(run.info.run_id, "FAILED")


def start_parent_run(
    tracking_uri: str,
    experiment_name: str,
    run_name: str = "pipeline",
    params: dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """Create the parent run of a pipeline.

    Args:
        tracking_uri: the MLflow store.
        experiment_name: created if missing.
        run_name: the parent's name.
        params: logged once as run parameters.
        tags: extra tags.

    Returns:
        The new run's id.
    """
    from mlflow.entities import Param

    client = _client(tracking_uri)
    experiment = experiment_id(tracking_uri, experiment_name)
    run = client.create_run(experiment, run_name=run_name, tags=dict(tags or {}))
    if params:
        client.log_batch(run.info.run_id, params=[Param(key, str(value)) for key, value in params.items()])
    return run.info.run_id


def start_child_run(tracking_uri: str, parent_run_id: str, run_name: str, stage: str | None = None) -> str:
    """Create a child run under ``parent_run_id`` (same experiment), for one stage.

    Unfinished runs with the same name in the experiment (an interrupted attempt) are marked FAILED
    first, so a bundle run with ``run_name`` can only pick this one.

    Returns:
        The child run's id.
    """
    client = _client(tracking_uri)
    parent = client.get_run(parent_run_id)
    _close_stale_runs(client, parent.info.experiment_id, run_name)
    run = client.create_run(
        parent.info.experiment_id,
        run_name=run_name,
        tags={PARENT_TAG: parent_run_id, STAGE_TAG: stage or run_name},
    )
    return run.info.run_id


def reopen_run(tracking_uri: str, run_id: str) -> None:
    """Set a run back to RUNNING, so the next ``MLFlowHandler`` with its name writes to it (MONAI's
    handler ends its run when its engine completes)."""
    _client(tracking_uri).update_run(run_id, status="RUNNING")


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Terminate a run with ``status`` (FINISHED, FAILED or KILLED)."""
    _client(tracking_uri).set_terminated(run_id, status)


def log_metrics(tracking_uri: str, run_id: str, values: Mapping[str, Any]) -> int:
    """Log the finite real numbers of ``values`` (name → value; other entries skipped) to a run, at step 0.

    Returns:
        How many metrics were logged.
    """
    import math
    import numbers
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [
        Metric(key, float(value), now, 0)
        for key, value in values.items()
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ]
    client = _client(tracking_uri)
    for start in range(0, len(metrics), 1000):  # MLflow's limit per batch
        client.log_batch(run_id, metrics=metrics[start : start + 1000])
    return len(metrics)


def child_runs(tracking_uri: str, parent_run_id: str) -> list[Any]:
    """The runs tagged as children of ``parent_run_id``, oldest first."""
    client = _client(tracking_uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=1000
    )
    return sorted(runs, key=lambda run: run.info.start_time)
