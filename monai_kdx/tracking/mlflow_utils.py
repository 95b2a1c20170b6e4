"""MLflow helpers shared by the bundles, the CLI and the tests.

The embedded default store is SQLite (``sqlite:///<output_dir>/mlruns.db``) with artifacts in
``<output_dir>/mlruns``: MONAI's ``MLFlowHandler`` refuses ``file:`` stores and keeps a SQLite
store's artifacts next to the database. Open it with
``mlflow ui --backend-store-uri sqlite:///<output_dir>/mlruns.db``.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["default_tracking_uri", "latest_run", "run_summary", "check_tracking_uri"]


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


def _files(listing: Any) -> list[str]:
    """Every file path below a store's folder, given ``listing(path)`` of one folder's entries (``None``: the top)."""
    files: list[str] = []
    pending = [None]
    while pending:
        for item in listing(pending.pop()):
            (pending if item.is_dir else files).append(item.path)
    return sorted(files)


def run_summary(tracking_uri: str, run: Any) -> dict[str, Any]:
    """Params, final metrics and artifact paths of a run, as plain Python values.

    Args:
        tracking_uri: the store the run lives in.
        run: an ``mlflow.entities.Run`` or a run id.

    Returns:
        ``{"run_id", "run_name", "status", "params", "metrics", "artifacts", "artifact_uri", "models"}``; ``models``
        maps the name of each MLflow logged model of the run to ``{"model_id", "status", "params", "tags",
        "artifacts"}``.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(run if isinstance(run, str) else run.info.run_id)
    models = {}
    for model in client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
    ):
        models[model.name] = {
            "model_id": model.model_id,
            "status": str(model.status),
            "params": dict(model.params),
            "tags": dict(model.tags),
            "artifacts": _files(lambda path, model=model: client.list_logged_model_artifacts(model.model_id, path)),
        }
    return {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "status": run.info.status,
        "params": dict(run.data.params),
        "metrics": dict(run.data.metrics),
        "artifacts": _files(lambda path: client.list_artifacts(run.info.run_id, path)),
        "artifact_uri": run.info.artifact_uri,
        "models": models,
    }


def check_tracking_uri(tracking_uri: str | None, timeout: float = 5.0) -> str | None:
    """Fail fast on a tracking store that cannot work, before any training starts.

    ``MLFLOW_TRACKING_URI`` wins over the argument (as in MONAI's ``MLFlowHandler``). An ``http(s)``
    server must answer its ``/health`` endpoint within ``timeout`` seconds (MLflow's own client would
    retry for minutes); a ``sqlite`` store's folder must be writable; ``file:`` stores are refused
    (MONAI's handler cannot use them).

    Args:
        tracking_uri: the bundle's ``tracking_uri`` (``None``: MLflow's default, not checked).
        timeout: seconds to wait for a server.

    Returns:
        The URI that will be used.

    Raises:
        ConnectionError: the server does not answer (the message names the URI and the reason).
        ValueError: a ``file:`` store or a plain path.
        PermissionError: the SQLite store's folder is not writable.
    """
    import urllib.error
    import urllib.request
    from urllib.parse import urlparse

    uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri
    if not uri:
        return uri
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                status = response.status
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise ConnectionError(
                f"MLflow tracking server {uri} is unreachable ({reason}); start it (mlflow server --host ... "
                f"--port ...) or log to a local store with --tracking_uri sqlite:///PATH/mlruns.db."
            ) from error
        if status != 200:
            raise ConnectionError(f"MLflow tracking server {uri} answered {url} with HTTP {status}.")
    elif scheme == "sqlite":
        path = uri[len("sqlite:///") :] if uri.startswith("sqlite:///") else ""
        folder = os.path.dirname(os.path.abspath(path)) if path else ""
        if folder:
            os.makedirs(folder, exist_ok=True)
            if not os.access(folder, os.W_OK):
                raise PermissionError(f"MLflow store {uri}: folder {folder!r} is not writable.")
    elif scheme in ("", "file") or len(scheme) == 1:  # a plain path (or a Windows drive letter)
        raise ValueError(
            f"tracking_uri {uri!r} is a file store, which MONAI's MLFlowHandler cannot use; "
            f"use sqlite:///PATH/mlruns.db or an http(s) server."
        )
    return uri
