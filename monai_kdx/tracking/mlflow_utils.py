"""MLflow helpers shared by the bundles, the CLI and the tests.

The embedded default store is SQLite (``sqlite:///<output_dir>/mlruns.db``) with artifacts in
``<output_dir>/mlruns``: MONAI's ``MLFlowHandler`` refuses ``file:`` stores and keeps a SQLite
store's artifacts next to the database. Open it with
``mlflow ui --backend-store-uri sqlite:///<output_dir>/mlruns.db``.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["default_tracking_uri", "latest_run", "run_summary"]


def default_tracking_uri(output_dir: str | os.PathLike) -> str:
    """The embedded SQLite tracking URI for an output folder (created if missing).

    Args:
        output_dir: the folder that will hold ``mlruns.db`` and the ``mlruns`` artifact folder.

    Returns:
        ``sqlite:///<absolute output_dir>/mlruns.db``.
    """
    from monai.utils import path_to_sqlite_uri

    folder = os.path.abspath(os.fspath(output_dir))
    os.makedirs(folder, exist_ok=True)
    return path_to_sqlite_uri(os.path.join(folder, "mlruns.db"))


def latest_run(tracking_uri: str, experiment_name: str, run_name: str | None = None) -> Any:
    """The most recent run of an experiment (optionally with a given run name).

    Args:
        tracking_uri: an MLflow tracking URI (e.g. from :func:`default_tracking_uri`).
        experiment_name: the experiment to search.
        run_name: only runs with this ``mlflow.runName``.

    Returns:
        An ``mlflow.entities.Run``.

    Raises:
        LookupError: the experiment or a matching run does not exist.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise LookupError(f"no MLflow experiment {experiment_name!r} at {tracking_uri}.")
    query = f"attributes.run_name = '{run_name}'" if run_name else ""
    runs = client.search_runs(
        [experiment.experiment_id], filter_string=query, order_by=["start_time DESC"], max_results=1
    )
    if not runs:
        raise LookupError(f"no run{f' named {run_name!r}' if run_name else ''} in experiment {experiment_name!r}.")
    return runs[0]


def run_summary(tracking_uri: str, run: Any) -> dict[str, Any]:
    """Params, final metrics and artifact paths of a run, as plain Python values.

    Args:
        tracking_uri: the store the run lives in.
        run: an ``mlflow.entities.Run`` or a run id.

    Returns:
        ``{"run_id", "run_name", "status", "params", "metrics", "artifacts", "artifact_uri"}``.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(run if isinstance(run, str) else run.info.run_id)
    artifacts: list[str] = []
    pending = [None]
    while pending:
        for item in client.list_artifacts(run.info.run_id, pending.pop()):
            if item.is_dir:
                pending.append(item.path)
            else:
                artifacts.append(item.path)
    return {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "status": run.info.status,
        "params": dict(run.data.params),
        "metrics": dict(run.data.metrics),
        "artifacts": sorted(artifacts),
        "artifact_uri": run.info.artifact_uri,
    }
