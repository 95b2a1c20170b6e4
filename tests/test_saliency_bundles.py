"""saliency_train.yaml end to end: real `python -m monai.bundle run` and `torchrun`, gaze heatmaps read
from the dataset's NIfTI files, the saliency term logged to a real MLflow store."""

from __future__ import annotations

import pytest
import torch
from conftest import VENV_BIN, bundle_network, bundle_run
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
def test_brain_mri_3d_saliency_train_with_torchrun_two_ranks_on_gloo(brain_teacher):
    """Both ranks end with the same weights (DDP all-reduces the saliency gradients too); only rank 0 logs."""
    tmp_path, env, uri = brain_teacher
    torchrun = (str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m")
    configs = ["train_teacher.yaml", "saliency_train.yaml", "multi_gpu_saliency.yaml"]
    extra = ("--run_name", "saliency_ddp", "--save_rank_weights", "true", "--batch_size", "2")
    bundle_run("brain_mri_3d", configs, tmp_path, env, *extra, launcher=torchrun)
    rank0 = torch.load(tmp_path / "runs" / "saliency_rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "runs" / "saliency_rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    initial = bundle_network("brain_mri_3d").state_dict()
    assert any(not torch.equal(rank0[k], initial[k]) for k in rank0 if k.endswith("weight"))  # it trained
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("brain_mri_3d").experiment_id])
    ddp_runs = [r for r in runs if r.info.run_name == "saliency_ddp"]
    assert len(ddp_runs) == 1 and "train_saliency" in ddp_runs[0].data.metrics


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
