"""Bad input, faults and security: every case gets one clear error (type and words) before any work, and nothing
read from a file chooses code to run."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from monai_kdx.networks import (
    NETWORKS,
    ShallowCNN,
    build_network,
    check_network_spec,
    load_weights,
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


def test_checkpoints_of_another_architecture_truncated_or_foreign_are_named_in_one_line(tmp_path):
    network = build_network(SHALLOW)
    good = tmp_path / "good.pt"
    torch.save({"model": network.state_dict(), "optimizer": {"state": {}}}, good)
    other = build_network(network_spec(network))

    def same(a, b) -> bool:
        return all(torch.equal(x, y) for x, y in zip(a.values(), b.values(), strict=True))

    assert not same(other.state_dict(), network.state_dict())
    load_weights(other, str(good))  # CheckpointSaver's {"model": ...} layout loads, the weights arrive
    assert same(other.state_dict(), network.state_dict())

    wider = tmp_path / "wider.pt"
    torch.save(build_network({**SHALLOW, "channels": [4, 16]}).state_dict(), wider)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    listed = tmp_path / "list.pt"
    torch.save([1, 2], listed)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    for path, words in (
        (wider, r"wider\.pt' does not fit ShallowCNN: \d+ of another shape \(first: blocks\.1"),
        (truncated, r"truncated\.pt' is corrupt or not a PyTorch checkpoint"),
        (listed, r"list\.pt' holds no state dict of tensors \(list\)"),
    ):
        with pytest.raises(ValueError, match=words) as raised:
            load_weights(other, str(path))
        assert "\n" not in str(raised.value)
    assert same(before, other.state_dict())  # nothing half-loaded
    with pytest.raises(ValueError, match=r"1 unexpected \(first: extra\)"):
        torch.save({**network.state_dict(), "extra": torch.ones(1)}, good)
        load_weights(other, str(good))


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


# ----------------------------------------------------------------------------------------------- class targets
@pytest.mark.parametrize(
    ("target", "error", "words"),
    [
        (1.7, ValueError, "target entry 0 is 1.7, not a whole-number class index"),
        (torch.tensor([0.0, 2.6]), ValueError, "entry 1 is 2.6, not a whole-number"),
        (True, TypeError, "must be integer class indices"),
        ("1", TypeError, "must be integer class indices"),
        (3, ValueError, "entry 0 is class 3, out of range for a network with 3 classes"),
        (torch.tensor([[0, 1, 0], [1, 0, 0]]), ValueError, "looks one-hot"),
        (torch.tensor([0, 1, 2]), ValueError, "3 entries for a batch of 2"),
    ],
)
def test_explanation_targets_are_checked_not_truncated(target, error, words):
    from monai_kdx.explain import HierarchicalCAM

    network = build_network(SHALLOW)
    with pytest.raises(error, match=words):
        HierarchicalCAM(network).cam(torch.randn(2, 1, 16, 16), target)


def test_fractional_labels_are_refused_by_relevance_and_metrics():
    from monai_kdx.pruning import collect_relevance

    network = build_network(SHALLOW)
    batches = [{"image": torch.randn(2, 1, 16, 16), "label": torch.tensor([0.0, 2.6])}]
    with pytest.raises(ValueError, match="label entry 1 is 2.6, not a whole-number class index"):
        collect_relevance(network, batches, "taylor")
    batches = [{"image": torch.randn(2, 1, 16, 16), "label": torch.tensor([[0.2, 0.8, 0.0], [1.0, 0.0, 0.0]])}]
    with pytest.raises(ValueError, match=r"label row 0 \(\[0.2.*is not one-hot"):
        collect_relevance(network, batches, "taylor")
    whole = [{"image": torch.randn(2, 1, 16, 16), "label": torch.tensor([0.0, 2.0])}]  # labels read as floats
    relevance = collect_relevance(network, whole, "taylor")
    assert relevance and all(torch.isfinite(value).all() and value.sum() > 0 for value in relevance.values())


# ------------------------------------------------------------------------------------------ network inputs
@pytest.mark.parametrize(
    ("inputs", "error", "words"),
    [
        (torch.randn(2, 3, 16, 16), ValueError, r"inputs of shape \(2, 3, 16, 16\) have 3 channel\(s\) but ShallowCNN "
         "expects 1"),
        (torch.randn(2, 1, 16, 16, dtype=torch.float64), TypeError, "inputs are torch.float64 but the weights of "
         "ShallowCNN are torch.float32"),
        (torch.zeros(2, 1, 16, 16, dtype=torch.int64), TypeError, "must be a floating-point tensor, got Tensor of "
         "torch.int64"),
        (torch.randn(2, 1, 8, 8, 8), ValueError, "have 3 spatial dimensions but ShallowCNN uses 2D convolutions"),
    ],
)
def test_explainers_name_a_wrong_channel_count_dtype_or_dimensionality(inputs, error, words):
    from monai_kdx.explain import build_explainer

    for method in ("gradcam", "integrated_gradients", "lrp"):
        with pytest.raises(error, match=words):
            build_explainer(method, build_network(SHALLOW)).attribute(inputs, 0)


def test_2d_calibration_data_for_a_3d_network_names_the_data_not_the_network():
    network = build_network({**SHALLOW, "spatial_dims": 3})
    batches = [(torch.randn(2, 1, 16, 16), torch.tensor([0, 1]))]
    with pytest.raises(ValueError, match="calibration images of shape .* have 2 spatial dimensions but ShallowCNN "
                       "uses 3D convolutions"):
        prune_by_relevance(network, batches, ratio=0.5, method="taylor")


# ------------------------------------------------------------------------------------------------- datalists
@pytest.fixture(scope="module")
def small_datalist(tmp_path_factory):
    from monai_kdx.data import write_dataset

    folder = tmp_path_factory.mktemp("data")
    return write_dataset(folder, kind="chest-xray-2d", n=12, seed=0, spatial_size=32)


def _edited(datalist, tmp_path, edit):
    import json

    content = json.loads(Path(datalist).read_text())
    edit(content)
    target = tmp_path / "datalist.json"  # paths stay relative to the data folder
    for section in ("training", "validation", "test"):
        for entry in content.get(section, []):
            for key in ("image", "mask", "gaze", "anatomy", "marker"):
                if isinstance(entry.get(key), str):
                    entry[key] = os.path.join(os.path.dirname(datalist), entry[key])
    target.write_text(json.dumps(content))
    return target


def test_a_good_datalist_is_summarized(small_datalist):
    from monai_kdx.data import check_datalist

    summary = check_datalist(small_datalist, num_classes=3, spatial_dims=2)
    assert summary.num_classes == 3 and summary.spatial_dims == 2 and summary.in_channels == 1
    assert summary.spatial_shapes == [(32, 32)] and {"mask", "gaze"} <= set(summary.keys)
    assert sum(summary.counts.values()) == 12


def test_a_class_missing_from_validation_is_a_warning_in_the_report(small_datalist, tmp_path):
    from monai_kdx.apps.pipeline import data_notes

    good = data_notes(small_datalist)
    assert good.startswith("Data: ") and "3 classes, 2D" in good and "warning" not in good
    for section in ("training", "validation", "test"):
        assert f"{section} " in good

    def drop_class_two(content):
        content["validation"] = [entry for entry in content["validation"] if entry["label"] != 2]

    content = json.loads(Path(small_datalist).read_text())
    assert any(entry["label"] == 2 for entry in content["validation"])  # the edit below really removes a class
    notes = data_notes(_edited(small_datalist, tmp_path, drop_class_two)).splitlines()
    assert notes[1:] == ["- **warning**: the validation section has no sample of class(es) [2]."]


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda c: c["training"][0].update(label=2.6), r"training entry 0 \(.*\): label 2.6 is not a non-negative"),
        (lambda c: c["training"][1].update(label="nodule"), r"training entry 1 .*label 'nodule' is not an integer"),
        (lambda c: c["training"][0].update(label=7), "label 7 is outside the 3 classes 0..2"),
        (lambda c: c["validation"].clear(), "the 'validation' section is missing or empty"),
        (lambda c: c["training"][0].update(image="nowhere.nii.gz"), r"training entry 0 \(.*nowhere.nii.gz\): the "
         "image .*does not exist"),
        (lambda c: c["test"][0].update(mask=c["test"][1]["image"].replace("images", "gaze") + "x"), "the mask"),
        (lambda c: [e.update(label=0) for e in c["training"] if e["label"] == 2], r"no sample of class\(es\) \[2\]"),
    ],
)
def test_bad_datalist_entries_are_named_in_one_line(small_datalist, tmp_path, edit, words):
    from monai_kdx.data import DatalistError, check_datalist

    with pytest.raises(DatalistError, match=words):
        check_datalist(_edited(small_datalist, tmp_path, edit), num_classes=3, spatial_dims=2)


def test_truncated_and_misshaped_files_are_named(small_datalist, tmp_path):
    import nibabel as nib

    from monai_kdx.data import DatalistError, check_datalist

    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(Path(_first(small_datalist, "image")).read_bytes()[:200])
    with pytest.raises(DatalistError, match=r"truncated.nii.gz.*cannot be read"):
        check_datalist(_edited(small_datalist, tmp_path, lambda c: c["training"][0].update(image=str(truncated))))
    volume = tmp_path / "volume.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 32), np.float32), np.eye(4)), volume)
    with pytest.raises(DatalistError, match=r"spatial shape \(32, 32, 32\), 3 dimension\(s\); expected 2D images"):
        check_datalist(_edited(small_datalist, tmp_path, lambda c: c["test"][0].update(image=str(volume))),
                       spatial_dims=2)  # fmt: skip
    small = tmp_path / "small_mask.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16), np.uint8), np.eye(4)), small)
    with pytest.raises(DatalistError, match=r"the mask .* has spatial shape \(16, 16\), the image \(32, 32\)"):
        check_datalist(_edited(small_datalist, tmp_path, lambda c: c["training"][2].update(mask=str(small))))


def _first(datalist, key):
    from monai_kdx.data import load_datalist

    return load_datalist(datalist, "training")[0][key]
