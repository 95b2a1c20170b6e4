"""MLflow helpers: the embedded default store and reading runs back."""

from __future__ import annotations

from .mlflow_utils import default_tracking_uri, latest_run, run_summary

__all__ = ["default_tracking_uri", "latest_run", "run_summary"]
