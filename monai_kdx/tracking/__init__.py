"""MLflow tracking: the embedded default store, fail-fast checks, pipeline parent/child runs, the run of
MONAI's ``MLFlowHandler`` on an engine, and classifiers as registered MLflow models."""

from __future__ import annotations

from .mlflow_utils import check_tracking_uri, default_tracking_uri, latest_run, run_summary
from .models import LoggedModel, load_classifier, log_classifier
from .runs import (
    PARENT_TAG,
    STAGE_TAG,
    artifact_location,
    child_runs,
    end_run,
    experiment_id,
    log_metrics,
    reopen_run,
    start_child_run,
    start_parent_run,
)

__all__ = [
    "check_tracking_uri",
    "default_tracking_uri",
    "latest_run",
    "run_summary",
    "LoggedModel",
    "load_classifier",
    "log_classifier",
    "PARENT_TAG",
    "STAGE_TAG",
    "artifact_location",
    "child_runs",
    "end_run",
    "experiment_id",
    "log_metrics",
    "reopen_run",
    "start_child_run",
    "start_parent_run",
]
