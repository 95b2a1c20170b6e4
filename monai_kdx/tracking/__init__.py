"""MLflow helpers: the embedded default store and reading runs back."""

from __future__ import annotations

from .mlflow_utils import check_tracking_uri, default_tracking_uri, latest_run, run_summary

__all__ = ["check_tracking_uri", "default_tracking_uri", "latest_run", "run_summary"]
