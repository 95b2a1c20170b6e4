"""Classifiers as MLflow models: logged models (MLflow 3) linked to the run that trained them, with a signature,
an input example, a description and tags, registered in the Model Registry, and loaded back to predict.

The model is an MLflow ``pyfunc`` model with this package's loader module
(:mod:`monai_kdx.tracking.pyfunc`) whose only data is a :func:`monai_kdx.pruning.save_pruned` file
(network spec + layer widths + weights): pruned and unpruned networks load back without unpickling any
module and without running code from the artifact store. ``predict`` maps an array of shape
(N, C, *spatial) to class probabilities (N, K).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["LoggedModel", "log_classifier", "load_classifier", "model_requirements"]

REQUIREMENTS = ("monai_kdx", "torch", "monai", "numpy", "mlflow")
"""The packages a logged classifier needs to load, pinned to the versions that logged it."""


@dataclass(frozen=True)
class LoggedModel:
    """Where a logged classifier lives: the MLflow logged model ``model_id`` (``model_uri``: ``models:/<model_id>``)
    of run ``run_id``, named ``name``, and when registered its registered name and version
    (``models:/<name>/<version>``)."""

    run_id: str
    name: str
    model_id: str
    registered_name: str | None = None
    version: str | None = None

    @property
    def model_uri(self) -> str:
        """``models:/<model_id>``: the logged model, registered or not."""
        return f"models:/{self.model_id}"

    @property
    def registry_uri(self) -> str | None:
        """``models:/<name>/<version>`` when registered."""
        return f"models:/{self.registered_name}/{self.version}" if self.registered_name else None


def model_requirements() -> list[str]:
    """``package==version`` of :data:`REQUIREMENTS` as installed (a package not installed is left unpinned)."""
    from importlib.metadata import PackageNotFoundError, version

    pinned = []
    for package in REQUIREMENTS:
        try:
            pinned.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            pinned.append(package)
    return pinned


@contextlib.contextmanager
def _global_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's global tracking URI set to ``uri`` while the block runs, then restored (MLflow's registry finds a
    logged model of ``models:/<model_id>`` there, not in the client's store)."""
    import mlflow

    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def _client(client_or_uri: Any) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=client_or_uri) if isinstance(client_or_uri, str) else client_or_uri


def _network_file(path: str, builder: Mapping[str, Any] | None, folder: str) -> str:
    """A ``save_pruned`` file for ``path``: the file itself when it is one, else the state-dict checkpoint
    loaded into the network ``builder`` specifies and saved in that format."""
    import torch

    from monai_kdx.networks import build_network, load_weights
    from monai_kdx.pruning.persistence import FORMAT, save_pruned

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no model file at {path!r}.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file
        raise ValueError(f"model file {path!r} cannot be read: {error}") from error
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        return path
    if builder is None:
        raise ValueError(
            f"{path!r} is a state dict: pass builder={{'network': <registered name>, **arguments}} to rebuild its "
            "network."
        )
    network = build_network(builder)
    load_weights(network, path)
    return save_pruned(network.eval(), os.path.join(folder, "network.pt"))


def log_classifier(
    client_or_uri: Any,
    run_id: str,
    path: str | os.PathLike,
    builder: Mapping[str, Any] | None = None,
    artifact_path: str = "model",
    registered_model_name: str | None = None,
    input_shape: Sequence[int] | None = None,
    description: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> LoggedModel:
    """Log a classifier file as an MLflow logged model (a pyfunc model) of run ``run_id`` and optionally register it.

    The logged model is linked to the run (the run's and the experiment's *Models* tabs list it), carries the
    network's class, parameter count and input shape as params, ``tags`` and ``description`` as tags, pinned
    requirements (:func:`model_requirements`) and, with ``input_shape``, a tensor signature and an input example.

    Args:
        client_or_uri: an ``MlflowClient`` (e.g. MONAI's ``MLFlowHandler.client``) or a tracking URI.
        run_id: the run that trained the model (it need not be active).
        path: a :func:`~monai_kdx.pruning.save_pruned` file, or a state-dict checkpoint (``CheckpointSaver``)
            together with ``builder``.
        builder: the network spec (``{"network": <registered name>, **arguments}``) of a state-dict checkpoint.
        artifact_path: the logged model's name (e.g. ``"student_model"``).
        registered_model_name: register the model under this name (a new version each call); ``None``: not
            registered.
        input_shape: ``(C, *spatial)`` of one input; when given, the model gets a tensor signature and an input
            example, and the network is checked to run on it.
        description: what the model is, for people: the registered model's and version's description.
        tags: tags of the logged model and of the registered version (values as strings).

    Returns:
        A :class:`LoggedModel`.

    Raises:
        FileNotFoundError, ValueError: the file is missing, unreadable, or a state dict without ``builder``.
    """
    import mlflow.pyfunc
    import numpy as np
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import Model

    from monai_kdx.networks import count_parameters
    from monai_kdx.pruning import load_pruned

    from .pyfunc import LOADER_MODULE

    client = _client(client_or_uri)
    path = os.fspath(path)
    tags = {key: str(value) for key, value in (tags or {}).items()}
    if description:
        tags["description"] = description
    with tempfile.TemporaryDirectory(prefix="monai_kdx_model_") as folder:
        network_file = _network_file(path, builder, folder)
        network = load_pruned(network_file).eval()
        params = {"network": type(network).__name__, "parameters": str(count_parameters(network))}
        signature = example = None
        if input_shape is not None:
            import torch
            from mlflow.models import infer_signature

            example = np.zeros((1, *[int(size) for size in input_shape]), dtype=np.float32)
            with torch.no_grad():
                probabilities = torch.softmax(network(torch.from_numpy(example)), dim=1).numpy()
            signature = infer_signature(example, probabilities)
            params["input_shape"] = str(tuple(int(size) for size in input_shape))
        experiment = client.get_run(run_id).info.experiment_id
        logged = client.create_logged_model(
            experiment, name=artifact_path, source_run_id=run_id, tags=tags, params=params, model_type="classifier"
        )
        try:
            client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
            local = os.path.join(folder, "model")
            meta = Model(artifact_path=logged.artifact_location, run_id=run_id, model_id=logged.model_id)
            mlflow.pyfunc.save_model(
                local,
                loader_module=LOADER_MODULE,
                data_path=network_file,
                signature=signature,
                input_example=example,
                pip_requirements=model_requirements(),
                mlflow_model=meta,
            )
            client.log_model_artifacts(logged.model_id, local)
        except BaseException:
            client.finalize_logged_model(logged.model_id, "FAILED")
            raise
        client.finalize_logged_model(logged.model_id, "READY")
    result = LoggedModel(run_id, artifact_path, logged.model_id)
    if registered_model_name is None:
        return result
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(registered_model_name)
    except MlflowException:
        client.create_registered_model(registered_model_name, description=description)
    with _global_tracking_uri(client.tracking_uri):  # MLflow resolves models:/<id> through the global URI
        version = client.create_model_version(
            registered_model_name,
            source=result.model_uri,
            run_id=run_id,
            tags=tags,
            description=description,
            model_id=logged.model_id,
        )
    return LoggedModel(run_id, artifact_path, logged.model_id, registered_model_name, str(version.version))


def load_classifier(model_uri: str, tracking_uri: str) -> Any:
    """Load a logged classifier (``models:/<model_id>``, ``models:/<name>/<version>`` from the registry, or
    ``runs:/…``) as an MLflow pyfunc model.

    The artifacts are downloaded from ``tracking_uri`` into a temporary folder that is removed before returning (the
    network is in memory by then); no global MLflow state is changed. Only models of this package's flavor are
    loaded, and nothing from the artifact store is executed: the model's ``MLmodel`` must name
    :mod:`monai_kdx.tracking.pyfunc` as its loader and carry no code, and the network is rebuilt through the
    allow-listed network registry (:func:`monai_kdx.pruning.load_pruned`).

    Returns:
        An ``mlflow.pyfunc.PyFuncModel``; ``.predict(array (N, C, *spatial))`` gives probabilities (N, K).

    Raises:
        ValueError: the model is not a monai_kdx classifier (another loader, or code shipped with it).
    """
    import mlflow.artifacts
    from mlflow.models import Model
    from mlflow.pyfunc import FLAVOR_NAME, PyFuncModel

    from . import pyfunc

    if model_uri.startswith("models:/"):  # resolved here: MLflow would ask the global tracking and registry URIs
        name, _, version = model_uri[len("models:/") :].partition("/")
        client = _client(tracking_uri)
        if version:
            model_uri = client.get_model_version_download_uri(name, version)
        else:  # models:/<model_id>, a logged model
            model_uri = client.get_logged_model(name).artifact_location
    with tempfile.TemporaryDirectory(prefix="monai_kdx_load_") as folder:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, tracking_uri=tracking_uri, dst_path=folder)
        meta = Model.load(os.path.join(local, "MLmodel"))
        conf = meta.flavors.get(FLAVOR_NAME) or {}
        if conf.get("loader_module") != pyfunc.LOADER_MODULE or conf.get("code") or "data" not in conf:
            raise ValueError(
                f"{model_uri} is not a monai_kdx classifier (loader {conf.get('loader_module')!r}, code "
                f"{conf.get('code')!r}); refusing to run code from the artifact store."
            )
        implementation = pyfunc._load_pyfunc(os.path.join(local, conf["data"]))
        return PyFuncModel(model_meta=meta, model_impl=implementation)
