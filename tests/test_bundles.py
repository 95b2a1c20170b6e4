"""Teacher bundles end to end: real `python -m monai.bundle run`, real NIfTI files, a real MLflow
SQLite store read back with MlflowClient; metadata verified against the bundle schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, bundle_network, bundle_run
from mlflow.tracking import MlflowClient

from monai_kdx.networks import load_weights
from monai_kdx.tracking import latest_run, run_summary


@pytest.mark.slow
def test_brain_mri_3d_teacher_train_then_evaluate_tracked_in_mlflow(brain_teacher):
    tmp_path, _, uri = brain_teacher
    train = run_summary(uri, latest_run(uri, "brain_mri_3d", "train_teacher"))
    assert train["status"] == "FINISHED"
    assert train["params"]["n_samples"] == "12" and train["params"]["dataset_kind"] == "brain-mri-3d"
    assert train["params"]["max_epochs"] == "2"
    assert {"train_loss", "train_accuracy", "val_accuracy"} <= set(train["metrics"])
    assert {"model.pt", "model_final.pt"} <= set(train["artifacts"])
    history = MlflowClient(uri).get_metric_history(train["run_id"], "val_accuracy")
    assert sorted(m.step for m in history) == [1, 2]  # one value per epoch
    # the artifact store sits next to the database, not in the working directory
    assert (tmp_path / "runs" / "mlartifacts" / "brain_mri_3d").as_uri() in train["artifact_uri"]
    assert not (tmp_path / "mlruns").exists()
    state = torch.load(tmp_path / "runs" / "models" / "model_final.pt", weights_only=True)
    assert state["class_layers.out.weight"].shape[0] == 4

    test = run_summary(uri, latest_run(uri, "brain_mri_3d", "evaluate_teacher"))
    assert 0.0 <= test["metrics"]["test_accuracy"] <= 1.0
    assert "test_predictions.csv" in test["artifacts"]
    datalist = json.loads((tmp_path / "data" / "datalist.json").read_text())
    rows = (tmp_path / "runs" / "predictions" / "test_predictions.csv").read_text().strip().splitlines()
    assert len(rows) == len(datalist["test"])


@pytest.mark.slow
def test_brain_mri_3d_distill_logs_every_loss_part(brain_teacher):
    tmp_path, env, uri = brain_teacher
    teacher_before = torch.load(tmp_path / "runs" / "models" / "model_final.pt", weights_only=True)
    bundle_run("brain_mri_3d", ["train_teacher.yaml", "distill.yaml"], tmp_path, env)
    distill = run_summary(uri, latest_run(uri, "brain_mri_3d", "distill"))
    assert {"train_loss", "train_task", "train_kd", "train_attention", "val_accuracy"} <= set(distill["metrics"])
    parts = distill["metrics"]
    assert parts["train_loss"] == pytest.approx(
        parts["train_task"] + parts["train_kd"] + parts["train_attention"], rel=1e-4
    )
    assert distill["params"]["student"] == "ShallowCNN"
    assert distill["params"]["teacher_checkpoint"] == str(tmp_path / "runs" / "models" / "model.pt")
    assert {"model.pt", "model_final.pt"} <= set(distill["artifacts"])
    load_weights(bundle_network("brain_mri_3d"), str(tmp_path / "runs" / "student" / "model_final.pt"))
    saved = torch.load(tmp_path / "runs" / "student" / "model_final.pt", weights_only=True)
    assert set(saved) == {"model", "distillation_loss"}  # student + loss (adapters), no teacher
    teacher_after = torch.load(tmp_path / "runs" / "models" / "model_final.pt", weights_only=True)
    assert all(torch.equal(teacher_before[k], teacher_after[k]) for k in teacher_before)  # checkpoints left alone


@pytest.mark.slow
def test_brain_mri_3d_explain_writes_overlaying_heatmaps_and_logs_metrics(brain_teacher):
    """explain.yaml: hierarchical maps of every test volume as NIfTI on the input's grid, PNG figures,
    localization and faithfulness metrics and the files themselves in the MLflow run."""
    import nibabel as nib
    import numpy as np

    from monai_kdx.transforms import case_name

    tmp_path, env, uri = brain_teacher
    bundle_run("brain_mri_3d", ["train_teacher.yaml", "explain.yaml"], tmp_path, env)
    datalist = json.loads((tmp_path / "data" / "datalist.json").read_text())
    folder = tmp_path / "runs" / "explanations" / "maps"
    for entry in datalist["test"]:
        stem = case_name(tmp_path / "data" / entry["image"], tmp_path / "data")  # images__case_0005
        source = nib.load(tmp_path / "data" / entry["image"])
        fused, levels = nib.load(folder / f"{stem}_cam.nii.gz"), nib.load(folder / f"{stem}_levels.nii.gz")
        for written in (fused, levels):
            np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
            assert written.shape[:3] == source.shape
        assert levels.shape[-1] == 3  # features.denseblock1..3 (denseblock4 is one voxel at 32^3: no map)
        fused_values = np.asarray(fused.dataobj)
        assert fused_values.min() >= 0 and fused_values.max() == pytest.approx(1.0)
        assert (folder.parent / "figures" / f"{stem}_cam.png").stat().st_size > 1000
    summary = run_summary(uri, latest_run(uri, "brain_mri_3d", "explain"))
    metrics = summary["metrics"]
    assert {"explained_accuracy", "pointing_game", "relevance_mass", "deletion_auc", "insertion_auc"} <= set(metrics)
    assert "max_epochs" not in summary["params"] and "test_accuracy" not in metrics  # an evaluator; explained cases
    assert 0 <= metrics["pointing_game"] <= 1 and 0 <= metrics["deletion_auc"] <= 1
    assert summary["params"]["explanation_method"] == "layercam"
    assert float(summary["params"]["explanation_smoothing"]) == 1.0  # for pixel attributions; CAMs stay as they are
    # in MLflow as on disk: maps/, figures/ and the case table
    assert len([a for a in summary["artifacts"] if a.startswith("maps/") and a.endswith("_cam.nii.gz")]) == len(
        datalist["test"]
    )
    assert len([a for a in summary["artifacts"] if a.startswith("figures/")]) == len(datalist["test"])
    # a random map beside the map; one row per case, whose means are the logged metrics
    assert {"random_pointing_game", "random_deletion_auc", "random_insertion_auc"} <= set(metrics)
    from monai_kdx.handlers import read_case_table

    rows = read_case_table(str(folder.parent / "cases.csv"))
    assert len(rows) == len(datalist["test"]) and "cases.csv" in summary["artifacts"]
    hits = [row["cam_pointing_game"] for row in rows if not np.isnan(row["cam_pointing_game"])]
    assert metrics["pointing_game"] == pytest.approx(np.mean(hits))
    assert metrics["explained_accuracy"] == pytest.approx(np.mean([row["correct"] for row in rows]))
    lesion_free = [row for row in rows if row["label"] == 0]  # class 0: no tumour, nothing to point at
    assert all(np.isnan(row["cam_pointing_game"]) for row in lesion_free)


@pytest.mark.slow
def test_chest_xray_2d_teacher_with_monai_tracking_flag_then_explanation_distillation(tmp_path, subprocess_env):
    """`--tracking mlflow` (MONAI's own settings) attaches to the same run as the default handlers; the
    2D distill config (KD + attention + explanation distillation) then trains a student from it."""
    bundle_run("chest_xray_2d", ["train_teacher.yaml"], tmp_path, subprocess_env, "--tracking", "mlflow")
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlruns.db'}"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("chest_xray_2d")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_name for r in runs] == ["train_teacher"]
    summary = run_summary(uri, runs[0])
    assert summary["params"]["dataset_kind"] == "chest-xray-2d"
    assert "val_accuracy" in summary["metrics"]
    # MONAI's tracking settings also export the executed config next to the outputs
    assert list((tmp_path / "runs").glob("config_*.json"))

    bundle_run("chest_xray_2d", ["train_teacher.yaml", "distill.yaml"], tmp_path, subprocess_env)
    parts = run_summary(uri, latest_run(uri, "chest_xray_2d", "distill"))["metrics"]
    assert parts["train_explanation"] > 0
    assert parts["train_loss"] == pytest.approx(
        parts["train_task"] + parts["train_kd"] + parts["train_attention"] + parts["train_explanation"], rel=1e-4
    )
    load_weights(bundle_network("chest_xray_2d"), str(tmp_path / "runs" / "student" / "model_final.pt"))

    explain = ["train_teacher.yaml", "explain.yaml"]
    bundle_run("chest_xray_2d", explain, tmp_path, subprocess_env, "--explanation_method", "gradcam")
    explained = run_summary(uri, latest_run(uri, "chest_xray_2d", "explain"))
    assert {"pointing_game", "relevance_mass", "deletion_auc", "insertion_auc"} <= set(explained["metrics"])
    assert explained["params"]["explanation_method"] == "gradcam"
    assert any(name.endswith("_cam.png") for name in explained["artifacts"])


@pytest.mark.parametrize("bundle", ["brain_mri_3d", "chest_xray_2d"])
def test_metadata_verifies_and_a_broken_one_fails(bundle, tmp_path):
    from monai.bundle import verify_metadata

    meta = REPO / "bundles" / bundle / "configs" / "metadata.json"
    schema = str(REPO / "bundles" / "meta_schema.json")
    verify_metadata(meta_file=str(meta), filepath=schema)  # raises on any violation
    broken = json.loads(meta.read_text())
    del broken["network_data_format"]["inputs"]["image"]["num_channels"]
    (tmp_path / "metadata.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="num_channels"):
        verify_metadata(meta_file=str(tmp_path / "metadata.json"), filepath=schema)


@pytest.mark.parametrize("bundle, sizes", [("brain_mri_3d", [8, 8, 8]), ("chest_xray_2d", [12, 6, 6])])
def test_split_fractions_and_train_seed_keys(bundle, sizes, tmp_path):
    """``split_fractions`` shapes the generated splits; ``train_seed`` seeds training, not the data."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "configs" / "train_teacher.yaml"))
    parser.update(
        {
            "bundle_root": str(REPO / "bundles" / bundle),
            "dataset_dir": str(tmp_path / "data"),
            "n_samples": 24,
            "spatial_size": 32,
            "split_fractions": [0.5, 0.25, 0.25],
            "train_seed": 7,
            "tracking_uri": f"sqlite:///{tmp_path / 'mlruns.db'}",
        }
    )
    datalist = json.loads(Path(parser.get_parsed_content("datalist")).read_text())
    # per class (brain: 4 classes of 6, chest: 3 of 8), round(k / 4) to validation and to test; the defaults
    # (0.7, 0.15, 0.15) would give brain 16/4/4 and chest 18/3/3
    assert [len(datalist[s]) for s in ("training", "validation", "test")] == sizes
    assert datalist["metadata"]["split_fractions"] == [0.5, 0.25, 0.25]
    parser.get_parsed_content("initialize")
    assert torch.initial_seed() == 7  # set_determinism(seed=train_seed); the dataset above kept seed 0
    assert parser.get_parsed_content("seed") == 0 and parser.get_parsed_content("training_params")["train_seed"] == 7


BUNDLES = ("brain_mri_3d", "chest_xray_2d")
# Where the two bundles may differ, per config file (ids as MONAI writes them; comments are not compared): the data,
# the classes, the experiment, the 2D augmentation (a random affine instead of a flip), the 2D distillation's
# explanation term and, without SyncBatchNorm for it, its torchrun override's network.
BUNDLE_DIFFERENCES = {
    "train_teacher.yaml": {
        "dataset_kind", "n_samples", "spatial_size", "spatial_dims", "num_classes", "batch_size", "experiment_name",
        "split_fractions#0", "split_fractions#2", "dataset_knobs",
        *(f"dataset_knobs#{knob}#{i}" for knob in ("lesion_size", "lesion_contrast") for i in (0, 1)),
        *(f"train#preprocessing#transforms#3#{key}" for key in (
            "_target_", "spatial_axis", "rotate_range", "scale_range", "padding_mode"
        )),
    },
    "distill.yaml": {
        "loss_keys#4", "explanation_weight", "distill_loss#weights#explanation", "tracked_params#explanation_weight",
        *(f"distill_loss#terms#explanation#{key}" for key in ("_target_", "mode", "student_layers", "teacher_layers")),
    },
    "saliency_train.yaml": {f"train#preprocessing#transforms#3#padding_mode#{i}" for i in (0, 1)},
    "multi_gpu_distill.yaml": {"sync_batchnorm", "network"},
    **{
        name: set()
        for name in (
            "evaluate.yaml", "explain.yaml", "prune.yaml", "multi_gpu_train.yaml", "multi_gpu_saliency.yaml",
            "multi_gpu_prune.yaml",
        )
    },
}  # fmt: skip


def _leaves(config, prefix: str = "") -> dict:
    """Every leaf value of a raw config by its id (``train#handlers#2#desc``)."""
    if not isinstance(config, (dict, list)) or not config:
        return {prefix: config}
    items = config.items() if isinstance(config, dict) else enumerate(config)
    leaves = {}
    for key, value in items:
        leaves.update(_leaves(value, f"{prefix}#{key}" if prefix else str(key)))
    return leaves


def _raw(bundle: str, name: str) -> dict:
    from monai.bundle import ConfigParser

    return ConfigParser.load_config_file(str(REPO / "bundles" / bundle / "configs" / name))


def test_the_two_bundles_differ_only_where_listed():
    """The 3D and the 2D bundle are each self-contained (MONAI's bundle layout), so their stage configs are written
    twice: they may differ only in the ids listed in ``BUNDLE_DIFFERENCES`` (a change to one bundle that is not made
    to the other fails here; so does a listed difference that is gone)."""
    names = [sorted(p.name for p in (REPO / "bundles" / b / "configs").iterdir()) for b in BUNDLES]
    assert names[0] == names[1]
    assert sorted(BUNDLE_DIFFERENCES) == [name for name in names[0] if name.endswith(".yaml")]
    for name, expected in BUNDLE_DIFFERENCES.items():
        brain, chest = (_leaves(_raw(bundle, name)) for bundle in BUNDLES)
        differing = {key for key in brain.keys() | chest.keys() if brain.get(key, KeyError) != chest.get(key, KeyError)}
        assert differing == expected, name
    configs = [REPO / "bundles" / bundle / "configs" for bundle in BUNDLES]
    assert (configs[0] / "logging.conf").read_text() == (configs[1] / "logging.conf").read_text()


@pytest.mark.parametrize("bundle", BUNDLES)
def test_each_bundle_fact_is_stated_once(bundle):
    """Architectures are plain specs declared in train_teacher.yaml only (``teacher_def``, ``student_def``), built by
    ``monai_kdx.networks.build_network``; ``spatial_dims`` is set once; every MLflow handler is built from the one
    ``mlflow_handler`` entry; every accuracy metric is a copy of ``accuracy``."""
    leaves = {name: _leaves(_raw(bundle, name)) for name in BUNDLE_DIFFERENCES}
    base = leaves["train_teacher.yaml"]
    assert base["teacher_def#network"] == "DenseNet121" and base["student_def#network"] == "ShallowCNN"
    removed = ("network_def", "student_builder", "teacher_builder", "prune_builder", "source_def")
    for name, config in leaves.items():
        ids = {key.split("#")[0].lstrip("+") for key in config}
        assert not ids & set(removed), name
        specs = {key for key in config if key.endswith("_def#network")}
        declared = {"teacher_def#network", "student_def#network"} if name == "train_teacher.yaml" else set()
        assert specs == declared, name
        assert not [key for key, value in config.items() if key.endswith("_target_") and "ShallowCNN" in str(value)]
        fixed_dims = [key for key, value in config.items() if key.endswith("spatial_dims") and value != "@spatial_dims"]
        assert fixed_dims == (["spatial_dims"] if name == "train_teacher.yaml" else []), name
        targets = [value for key, value in config.items() if key.endswith("_target_")]
        assert "monai_kdx.handlers.MLflowRunHandler" not in targets or name == "train_teacher.yaml", name
        assert "MLFlowHandler" not in targets, name  # MONAI's own would adopt finished and failed runs
        assert "ignite.metrics.Accuracy" not in targets or name == "train_teacher.yaml", name
    run_handlers = [key for key, value in base.items() if value == "monai_kdx.handlers.MLflowRunHandler"]
    assert run_handlers == ["mlflow_handler#_target_"]
    assert [key for key, value in base.items() if value == "ignite.metrics.Accuracy"] == ["accuracy#_target_"]


@pytest.mark.parametrize("bundle", BUNDLES)
def test_prune_overlay_disables_the_base_checkpoint_savers(bundle):
    """prune.yaml reuses the base's handler lists by position: the positions it disables are the CheckpointSavers
    (the pruned network is saved by the pruning handler) and the one it renames is the progress bar."""
    from monai.bundle import ConfigParser

    configs = REPO / "bundles" / bundle / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / "train_teacher.yaml"), str(configs / "prune.yaml")])
    for section in ("train", "validate"):
        handlers = parser[f"{section}#handlers"]
        savers = [h for h in handlers if h["_target_"] == "CheckpointSaver"]
        assert savers and all(h["_disabled_"] is True for h in savers), section
        assert all(h.get("_disabled_") is not True for h in handlers if h["_target_"] != "CheckpointSaver"), section
    assert parser["train#handlers#2"]["_target_"] == "monai_kdx.handlers.ProgressBar"
