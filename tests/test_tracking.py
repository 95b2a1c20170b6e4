"""MLflow tracking through the real store: the model logger writes into the run of MONAI's MLFlowHandler,
models load back from the registry and predict without pickled modules, parent/child runs, and
fail-fast checks of the tracking URI (also from a real `monai.bundle run`)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import REPO
from ignite.engine import Engine, Events
from mlflow.tracking import MlflowClient
from monai.engines import SupervisedTrainer
from monai.handlers import MLFlowHandler

from monai_kdx.handlers import MLflowModelLogger, MLflowRunHandler
from monai_kdx.networks import ShallowCNN
from monai_kdx.pruning import load_pruned, prune_by_relevance, save_pruned
from monai_kdx.tracking import (
    PARENT_TAG,
    Tracker,
    check_tracking_uri,
    load_classifier,
    log_classifier,
    run_summary,
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _builder(spatial_dims: int) -> dict:
    return {
        "_target_": "monai_kdx.networks.ShallowCNN",
        "spatial_dims": spatial_dims,
        "in_channels": 1,
        "out_channels": 3,
        "channels": [4, 8, 8],
    }


def _data(spatial_dims: int, n: int = 4) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        {"image": torch.randn(2, 1, *[16] * spatial_dims, generator=generator), "label": torch.tensor([i % 3, 1])}
        for i in range(n // 2)
    ]


def _trainer(network, handlers, spatial_dims: int = 2, max_epochs: int = 1) -> SupervisedTrainer:
    """A small MONAI trainer of ``network`` on :func:`_data` with ``handlers``."""
    return SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=max_epochs,
        train_data_loader=_data(spatial_dims),
        network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.1),
        loss_function=torch.nn.CrossEntropyLoss(),
        train_handlers=handlers,
        decollate=False,
    )


def _run_handler(uri: str) -> MLflowRunHandler:
    return MLflowRunHandler(
        tracking_uri=uri,
        experiment_name="exp",
        run_name="train",
        output_transform=lambda output: output["loss"].item(),
        close_on_complete=True,
    )


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("logger_first", [True, False])
def test_model_logger_writes_into_the_mlflow_handlers_run_and_registers(tmp_path, spatial_dims, logger_first):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    torch.manual_seed(0)
    network = ShallowCNN(spatial_dims, 1, 3, channels=(4, 8, 8))
    checkpoint = tmp_path / "model.pt"
    handler = _run_handler(uri)
    logger = MLflowModelLogger(checkpoint, builder=_builder(spatial_dims), registered_model_name="tiny")
    trainer = _trainer(network, [logger, handler] if logger_first else [handler, logger], spatial_dims, max_epochs=2)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: torch.save({"model": network.state_dict()}, checkpoint))
    trainer.run()

    summary = run_summary(uri, logger.logged.run_id)
    assert summary["run_name"] == "train" and summary["status"] == "FINISHED"
    assert "Loss" in summary["metrics"]  # the handler's own metric: the same run
    logged = summary["models"]["model"]  # an MLflow logged model of the run, with its network and example
    assert {"MLmodel", "data/network.pt", "input_example.json", "requirements.txt"} <= set(logged["artifacts"])
    assert logged["status"] == "READY" and logged["params"]["network"] == "ShallowCNN"
    assert logger.logged.registry_uri == "models:/tiny/1"
    version = MlflowClient(uri).get_model_version("tiny", "1")
    assert version.source == f"models:/{logged['model_id']}" and version.run_id == logger.logged.run_id

    model = load_classifier(logger.logged.registry_uri, uri)
    x = np.random.default_rng(0).standard_normal((3, 1, *[16] * spatial_dims)).astype(np.float32)
    network.eval()
    with torch.no_grad():
        expected = torch.softmax(network(torch.from_numpy(x)), 1).numpy()
    np.testing.assert_allclose(model.predict(x), expected, atol=1e-5)


def test_model_logger_refuses_a_stale_file_an_earlier_run_left(tmp_path):
    """A checkpoint this run never wrote (an earlier run's model.pt) is not logged: the run fails, naming it."""
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    network = ShallowCNN(2, 1, 3, channels=(4, 8, 8))
    stale = tmp_path / "model.pt"
    torch.save({"model": network.state_dict()}, stale)
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    logger = MLflowModelLogger(stale, builder=_builder(2), registered_model_name="tiny")
    trainer = _trainer(network, [_run_handler(uri), logger])
    with pytest.raises(FileNotFoundError, match=r"model\.pt was not written by this run \(last written"):
        trainer.run()
    assert logger.logged is None
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert run.info.status == "FAILED"
    assert not client.search_registered_models()  # nothing registered


def test_model_logger_without_mlflow_handler_fails_before_training(tmp_path):
    network = ShallowCNN(2, 1, 3, channels=(4, 8))
    iterations = []
    trainer = _trainer(network, [MLflowModelLogger(tmp_path / "model.pt", builder=_builder(2))])
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: iterations.append(1))
    with pytest.raises(RuntimeError, match="MLflowRunHandler attached to the same engine"):
        trainer.run()
    assert not iterations


def test_pruned_model_registered_loads_without_pickles_and_predicts(tmp_path):
    """A really pruned 3D network (fewer channels than its builder makes) goes through the registry and back."""
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    torch.manual_seed(0)
    network = ShallowCNN(3, 1, 3, channels=(8, 8, 8))
    builder = _builder(3) | {"channels": [8, 8, 8]}
    example = torch.randn(1, 1, 16, 16, 16)
    pruned = prune_by_relevance(network, None, 0.5, "magnitude", example_inputs=example, builder=builder)
    path = save_pruned(pruned, tmp_path / "pruned.pt")
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in network.parameters())
    parent = Tracker(uri).start_parent("exp", params={"ratio": 0.5})
    child = Tracker(uri).start_child(parent, "prune")
    logged = log_classifier(uri, child, path, registered_model_name="pruned", input_shape=(1, 16, 16, 16))
    Tracker(uri).end(child)
    Tracker(uri).end(parent)

    artifacts = run_summary(uri, child)["models"]["model"]["artifacts"]
    assert "MLmodel" in artifacts
    stored = next(a for a in artifacts if a.startswith("data/"))
    payload = torch.load(_download(uri, logged.model_id, stored), weights_only=True)
    assert payload["format"].startswith("monai_kdx.pruned")  # tensors and plain data only

    model = load_classifier(logged.registry_uri, uri)
    x = torch.randn(2, 1, 16, 16, 16)
    reference = load_pruned(path).eval()
    with torch.no_grad():
        np.testing.assert_allclose(model.predict(x.numpy()), torch.softmax(reference(x), 1).numpy(), atol=1e-5)
    assert [run.info.run_id for run in Tracker(uri).child_runs(parent)] == [child]


def _download(uri: str, model_id: str, path: str) -> str:
    import mlflow.artifacts

    location = MlflowClient(uri).get_logged_model(model_id).artifact_location
    return mlflow.artifacts.download_artifacts(f"{location}/{path}", tracking_uri=uri)


def test_log_classifier_rejects_bad_files_before_logging(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    parent = Tracker(uri).start_parent("exp")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    state = tmp_path / "state.pt"
    torch.save(ShallowCNN(2, 1, 3, (4, 8)).state_dict(), state)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        log_classifier(uri, parent, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="garbage.pt"):
        log_classifier(uri, parent, garbage)
    with pytest.raises(ValueError, match="builder"):
        log_classifier(uri, parent, state)
    assert run_summary(uri, parent)["artifacts"] == [] and run_summary(uri, parent)["models"] == {}


def test_child_runs_and_a_failed_attempt_do_not_capture_the_handlers_run(tmp_path):
    """MONAI's handler takes the oldest unfinished run with its name: a failed attempt must not be it."""
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    parent = Tracker(uri).start_parent("exp")
    failed = Tracker(uri).start_child(parent, "distill")
    Tracker(uri).end(failed, "FAILED")
    retry = Tracker(uri).start_child(parent, "distill")
    handler = MLFlowHandler(tracking_uri=uri, experiment_name="exp", run_name="distill")
    engine = Engine(lambda engine, batch: None)
    engine.state.max_epochs, engine.state.epoch_length = 1, 1
    handler.start(engine)
    assert handler.cur_run.info.run_id == retry
    runs = {run.info.run_id: run for run in Tracker(uri).child_runs(parent)}
    assert runs[failed].info.run_name == "distill (failed)" and runs[failed].info.status == "FAILED"
    assert runs[retry].data.tags[PARENT_TAG] == parent


def test_check_tracking_uri(tmp_path):
    port = _free_port()
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}.*unreachable"):
        check_tracking_uri(f"http://127.0.0.1:{port}", timeout=2)
    with pytest.raises(ValueError, match="file store"):
        check_tracking_uri(str(tmp_path / "mlruns"))
    with pytest.raises(ValueError, match="file store"):
        check_tracking_uri(f"file://{tmp_path}")
    uri = f"sqlite:///{tmp_path / 'new' / 'mlruns.db'}"
    assert check_tracking_uri(uri) == uri and (tmp_path / "new").is_dir()


def test_bundle_with_unreachable_server_fails_before_any_work(tmp_path, subprocess_env):
    root = REPO / "bundles" / "brain_mri_3d"
    port = _free_port()
    result = subprocess.run(
        [
            sys.executable, "-m", "monai.bundle", "run",
            "--config_file", str(root / "configs" / "train_teacher.yaml"),
            "--meta_file", str(root / "configs" / "metadata.json"),
            "--bundle_root", str(root),
            "--output_dir", str(tmp_path / "runs"),
            "--dataset_dir", str(tmp_path / "data"),
            "--tracking_uri", f"http://127.0.0.1:{port}",
        ],
        capture_output=True, text=True, env=subprocess_env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert f"MLflow tracking server http://127.0.0.1:{port} is unreachable" in result.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs" / "models").exists()


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_run_handler_marks_a_failure_and_never_adopts_a_finished_or_failed_run(tmp_path, spatial_dims):
    uri = f"sqlite:///{tmp_path / 'store' / 'mlruns.db'}"
    network = ShallowCNN(spatial_dims, 1, 3, channels=(4, 8))
    data = _data(spatial_dims)

    def trainer(fail: bool) -> SupervisedTrainer:
        handler = MLflowRunHandler(
            tracking_uri=uri, experiment_name="exp", run_name="train", close_on_complete=True,
            output_transform=lambda output: output["loss"].item(),
        )  # fmt: skip
        engine = SupervisedTrainer(
            device=torch.device("cpu"), max_epochs=1, train_data_loader=data, network=network,
            optimizer=torch.optim.SGD(network.parameters(), lr=0.1), loss_function=torch.nn.CrossEntropyLoss(),
            train_handlers=[handler], decollate=False,
        )  # fmt: skip
        if fail:
            engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: 1 / 0)
        return engine

    with pytest.raises(ZeroDivisionError):
        trainer(fail=True).run()
    good = trainer(fail=False)
    good.run()
    again = trainer(fail=False)
    again.run()

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("exp")
    runs = client.search_runs([experiment.experiment_id], order_by=["start_time ASC"])
    assert [run.info.status for run in runs] == ["FAILED", "FINISHED", "FINISHED"]  # three runs, none adopted
    assert good.state.mlflow_run[1] == runs[1].info.run_id != again.state.mlflow_run[1]
    # the artifacts live next to the store, not in ./mlruns of the working directory
    assert experiment.artifact_location == (tmp_path / "store" / "mlartifacts" / "exp").as_uri()
