"""saliency_train.yaml end to end: real `python -m monai.bundle run` (torchrun: tests/test_distributed.py), gaze
heatmaps read from the dataset's NIfTI files, the saliency term logged to a real MLflow store."""

from __future__ import annotations

import pytest
from conftest import bundle_network, bundle_run
from mlflow.tracking import MlflowClient

from monai_kdx.networks import load_weights
from monai_kdx.tracking import latest_run, run_summary


@pytest.mark.slow
def test_brain_mri_3d_saliency_train_logs_the_saliency_term(brain_teacher):
    tmp_path, env, uri = brain_teacher
    bundle_run("brain_mri_3d", ["train_teacher.yaml", "saliency_train.yaml"], tmp_path, env)
    summary = run_summary(uri, latest_run(uri, "brain_mri_3d", "saliency_train"))
    metrics, params = summary["metrics"], summary["params"]
    assert {"train_loss", "train_saliency", "val_accuracy"} <= set(metrics)
    assert 0 < metrics["train_saliency"] <= 2 and metrics["train_loss"] > metrics["train_saliency"]  # CE + (1 - CC)
    assert params["saliency_divergence"] == "cc" and params["saliency_target"] == "gaze"
    assert params["network"] == "ShallowCNN" and params["saliency_loss"] == "SaliencyAlignmentLoss"
    history = MlflowClient(uri).get_metric_history(summary["run_id"], "train_saliency")
    assert sorted(m.step for m in history) == [1, 2]
    # a plain ShallowCNN checkpoint: inference needs nothing of the saliency machinery
    load_weights(bundle_network("brain_mri_3d"), str(tmp_path / "runs" / "saliency" / "model_final.pt"))


@pytest.mark.slow
def test_chest_xray_2d_saliency_train_with_the_gain_loss(tmp_path, subprocess_env):
    """The 2D bundle, with the loss swapped from the command line (GAIN: attention mining + pixel supervision)."""
    gain = "$monai_kdx.losses.saliency.GAINLoss('blocks.2')"  # GAIN masks the image with one layer's map
    bundle_run(
        "chest_xray_2d", ["train_teacher.yaml", "saliency_train.yaml"], tmp_path, subprocess_env,
        "--saliency_loss", gain, "--spatial_size", "64",
    )  # fmt: skip
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlruns.db'}"
    summary = run_summary(uri, latest_run(uri, "chest_xray_2d", "saliency_train"))
    assert {"train_loss", "train_saliency", "val_accuracy"} <= set(summary["metrics"])
    assert summary["params"]["dataset_kind"] == "chest-xray-2d" and summary["params"]["saliency_loss"] == "GAINLoss"
    load_weights(bundle_network("chest_xray_2d"), str(tmp_path / "runs" / "saliency" / "model_final.pt"))
