"""MLflow tracking: the embedded default store, fail-fast checks, pipeline parent/child runs through one
:class:`Tracker`, and classifiers as registered MLflow models."""

from __future__ import annotations

from .mlflow_utils import check_tracking_uri, default_tracking_uri, latest_run, run_summary
from .models import LoggedModel, load_classifier, log_classifier
from .runs import PARENT_TAG, STAGE_TAG, Tracker, artifact_location, experiment_id

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
    "Tracker",
    "artifact_location",
    "experiment_id",
]
