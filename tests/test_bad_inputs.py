"""Bad input, faults and security: every case gets one clear error (type and words) before any work, and nothing
read from a file chooses code to run."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch
from torch import nn

from monai_kdx.networks import (
    NETWORKS,
    ShallowCNN,
    build_network,
    check_network_spec,
    network_spec,
    register_network,
)
from monai_kdx.networks.builders import Integer
from monai_kdx.pruning import FORMAT, load_pruned, prune_by_relevance, save_pruned

SHALLOW = {"network": "ShallowCNN", "spatial_dims": 2, "in_channels": 1, "out_channels": 3, "channels": [4, 8]}


def _write(path, **payload):
    base = {"format": FORMAT, "builder": SHALLOW, "modules": {}, "state_dict": {}, "training": False, "metadata": {}}
    torch.save({**base, **payload}, path)
    return path


# --------------------------------------------------------------------------------------------------- security
def test_a_pruned_file_naming_any_callable_runs_nothing(tmp_path):
    marker = tmp_path / "executed"
    builder = {"_target_": "subprocess.run", "args": ["touch", str(marker)]}
    path = _write(tmp_path / "evil.pt", builder=builder)
    with pytest.raises(KeyError, match=r"evil\.pt.*unknown network entry 'subprocess\.run'"):
        load_pruned(path)
    assert not marker.exists()
    for target in ("os.system", "builtins.eval", "monai_kdx.pruning.load_pruned", "torch.nn.Module"):
        with pytest.raises(KeyError, match="unknown network entry"):
            load_pruned(_write(tmp_path / "other.pt", builder={"network": target}))


@pytest.mark.parametrize(
    ("change", "error", "words"),
    [
        ({"channels": [1_000_000_000]}, ValueError, r"'channels\[0\]' must be in \[1, 4096\]"),
        ({"channels": [4.0, 8]}, TypeError, r"'channels\[0\]' must be an integer"),
        ({"spatial_dims": 2.0}, ValueError, r"'spatial_dims' must be one of \[2, 3\]"),
        ({"in_channels": True}, TypeError, "'in_channels' must be an integer"),
        ({"dropout": float("nan")}, TypeError, "'dropout' must be a finite number"),
        ({"norm": "layer"}, ValueError, "'norm' must be one of"),
        ({"act": "os.system"}, ValueError, r"takes no argument\(s\) \['act'\]"),
        ({"out_channels": -1}, ValueError, "'out_channels' must be in"),
    ],
)
def test_network_arguments_are_checked_by_type_and_range(tmp_path, change, error, words):
    with pytest.raises(error, match=words):
        check_network_spec({**SHALLOW, **change})
    with pytest.raises(error, match=words):
        load_pruned(_write(tmp_path / "bad.pt", builder={**SHALLOW, **change}))


def test_a_network_too_large_is_refused_without_allocating_it():
    spec = {"network": "DenseNet121", "spatial_dims": 3, "in_channels": 1, "out_channels": 2, "init_features": 4096,
            "growth_rate": 1024}
    with pytest.raises(ValueError, match="parameters, more than the limit"):
        build_network(spec)
    assert check_network_spec(spec, max_parameters=None)["network"] == "DenseNet121"


def test_missing_or_foreign_spec_keys():
    with pytest.raises(TypeError, match="names its builder under 'network'"):
        check_network_spec({"spatial_dims": 2})
    with pytest.raises(TypeError, match="must be a mapping"):
        check_network_spec("ShallowCNN")
    with pytest.raises(ValueError, match=r"needs the argument\(s\) \['out_channels'\]"):
        check_network_spec({"network": "ShallowCNN", "spatial_dims": 2, "in_channels": 1})


def test_layer_widths_in_the_file_are_checked(tmp_path):
    network = build_network(SHALLOW)
    path = save_pruned(network, tmp_path / "good.pt")
    payload = torch.load(path, weights_only=True)
    cases = [
        ({"blocks.0.0": {"type": "Conv2d", "forward": 1}}, r"'forward' is not a width of a Conv2d"),
        ({"blocks.0.0": {"type": "Conv2d", "out_channels": 10**9}}, "is not a pruned width of 4"),
        ({"blocks.0.0": {"type": "Conv2d", "out_channels": 0}}, "is not a pruned width of 4"),
        ({"blocks.0.0": {"type": "Linear", "out_features": 2}}, "the file has a Linear, the built network Conv2d"),
        ({"nowhere": {"type": "Conv2d"}}, "the built network missing"),
    ]
    for modules, words in cases:
        with pytest.raises(ValueError, match=words):
            load_pruned(_write(tmp_path / "bad.pt", modules=modules, state_dict=payload["state_dict"]))
    big = dict(payload["state_dict"], **{"head.4.weight": torch.zeros(3, 64)})
    with pytest.raises(ValueError, match="larger than the unpruned"):
        load_pruned(_write(tmp_path / "bad.pt", modules=payload["modules"], state_dict=big))


def test_a_file_without_modules_or_weights_is_named(tmp_path):
    path = tmp_path / "incomplete.pt"
    torch.save({"format": FORMAT, "builder": SHALLOW, "state_dict": {}}, path)
    with pytest.raises(ValueError, match=r"incomplete\.pt' has no \['modules'\] entry"):
        load_pruned(path)
    torch.save({"format": FORMAT, "builder": SHALLOW}, path)
    with pytest.raises(ValueError, match=r"has no \['modules', 'state_dict'\] entries"):
        load_pruned(path)


def test_specs_travel_with_built_and_pruned_networks(tmp_path):
    network = build_network({**SHALLOW, "channels": [8, 8]})
    assert network_spec(network)["channels"] == [8, 8]
    batches = [(torch.randn(2, 1, 16, 16), torch.tensor([0, 1]))]
    pruned = prune_by_relevance(network, batches, ratio=0.5, method="magnitude")
    assert network_spec(pruned) == network_spec(network)
    loaded = load_pruned(save_pruned(pruned, tmp_path / "p.pt"))  # no builder argument needed
    assert loaded.blocks[0][0].out_channels == 4 and network_spec(loaded) == network_spec(network)
    with pytest.raises(KeyError, match="unknown network entry 'my.Net'"):
        save_pruned(pruned, tmp_path / "q.pt", builder={"network": "my.Net"})
    with pytest.raises(ValueError, match="save_pruned needs builder"):
        save_pruned(ShallowCNN(2, 1, 3), tmp_path / "r.pt")


def test_a_caller_registers_its_own_network(tmp_path):
    class Tiny(nn.Module):
        def __init__(self, out_channels: int) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.head = nn.Linear(4, out_channels)

        def forward(self, x):
            return self.head(self.conv(x).mean((2, 3)))

    register_network("test.Tiny", Tiny, required=("out_channels",), out_channels=Integer(1, 10))
    try:
        network = build_network({"network": "test.Tiny", "out_channels": 3})
        copy = load_pruned(save_pruned(network, tmp_path / "tiny.pt"))
        x = torch.randn(2, 1, 8, 8)
        torch.testing.assert_close(copy(x), network(x))
        with pytest.raises(ValueError, match="'out_channels' must be in"):
            build_network({"network": "test.Tiny", "out_channels": 11})
    finally:
        NETWORKS.unregister("test.Tiny")


def _log_model_from_code(tmp_path, uri: str, marker) -> str:
    """An MLflow "model from code" whose Python file writes ``marker`` when executed."""
    import mlflow.pyfunc
    from mlflow.tracking import MlflowClient

    code = tmp_path / "model_code.py"
    code.write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "import mlflow\nfrom mlflow.pyfunc import PythonModel\n"
        "class M(PythonModel):\n    def predict(self, context, model_input, params=None):\n        return model_input\n"
        "mlflow.models.set_model(M())\n"
    )
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("evil"))
    local = tmp_path / "model"
    mlflow.pyfunc.save_model(str(local), python_model=str(code), pip_requirements=["mlflow"])
    marker.unlink(missing_ok=True)  # saving may have run it
    client.log_artifacts(run.info.run_id, str(local), "model")
    return f"runs:/{run.info.run_id}/model"


def test_load_classifier_runs_no_code_from_the_artifact_store_and_leaves_no_folder(tmp_path, monkeypatch):
    from monai_kdx.tracking import load_classifier, log_classifier

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    marker = tmp_path / "executed"
    model_uri = _log_model_from_code(tmp_path, uri, marker)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with pytest.raises(ValueError, match="is not a monai_kdx classifier .*refusing to run code"):
        load_classifier(model_uri, uri)
    assert not marker.exists()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("good"))
    network = build_network(SHALLOW).eval()
    logged = log_classifier(client, run.info.run_id, save_pruned(network, tmp_path / "net.pt"), input_shape=(1, 16, 16))
    before = sorted(os.listdir(scratch))
    model = load_classifier(logged.model_uri, uri)
    assert sorted(os.listdir(scratch)) == before  # nothing left behind
    x = np.random.default_rng(0).standard_normal((2, 1, 16, 16)).astype(np.float32)
    with torch.no_grad():
        expected = torch.softmax(network(torch.from_numpy(x)), 1).numpy()
    np.testing.assert_allclose(model.predict(x), expected, atol=1e-5)
