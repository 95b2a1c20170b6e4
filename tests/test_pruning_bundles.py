"""prune.yaml end to end: real `python -m monai.bundle run` on tiny settings, the pruned file loaded back with
``load_pruned`` in a fresh process, the MLflow run read back with MlflowClient."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, bundle_run

from monai_kdx.tracking import latest_run, run_summary

_LOAD = """
import json, sys, torch
from monai_kdx.networks import count_parameters, network_spec
from monai_kdx.pruning import load_pruned
net = load_pruned(sys.argv[1]).eval()
with torch.no_grad():
    out = net(torch.randn(1, 1, *[int(s) for s in sys.argv[2].split(",")]))
print(json.dumps({"params": count_parameters(net), "out": list(out.shape), "type": type(net).__name__,
                  "builder": network_spec(net)}))
"""


def _load_fresh(path, spatial, env):
    out = subprocess.run(
        [sys.executable, "-c", _LOAD, str(path), ",".join(map(str, spatial))],
        capture_output=True, text=True, env=env, check=True, timeout=120,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def _one_thread(env):
    return {**env, "OMP_NUM_THREADS": "1"}  # the 2-core machine is shared: avoid OpenMP spin contention


@pytest.mark.slow
def test_brain_mri_3d_prune_teacher_then_evaluate_the_pruned_file(brain_teacher):
    tmp_path, env, uri = brain_teacher
    env = _one_thread(env)
    bundle_run("brain_mri_3d", ["train_teacher.yaml", "prune.yaml"], tmp_path, env, "--prune_source", "teacher",
               "--prune_ratio", "0.5", "--prune_method", "lrp")  # fmt: skip
    run = run_summary(uri, latest_run(uri, "brain_mri_3d", "prune"))
    assert run["status"] == "FINISHED"
    params, metrics = run["params"], run["metrics"]
    assert params["prune_ratio"] == "0.5" and params["prune_method"] == "lrp" and params["prune_source"] == "teacher"
    assert params["source_checkpoint"] == str(tmp_path / "runs" / "models" / "model.pt")
    assert metrics["prune_steps"] == 1 and metrics["prune_stopped"] == 0
    assert metrics["prune_params"] < 0.5 * metrics["prune_params_before"]
    assert metrics["prune_macs"] < metrics["prune_macs_before"]
    assert {"prune_accuracy_before", "prune_accuracy", "prune_agreement", "prune_latency_ms", "val_accuracy"} <= set(
        metrics
    )
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert "model_pruned.pt" in run["artifacts"]

    pruned_file = tmp_path / "runs" / "pruned" / "model_pruned.pt"
    loaded = _load_fresh(pruned_file, (32, 32, 32), env)
    assert loaded["type"] == "DenseNet121" and loaded["out"] == [1, 4]
    assert loaded["params"] == metrics["prune_params"]
    assert loaded["builder"]["network"] == "DenseNet121"  # the bundle's teacher_def, recorded by build_network

    # evaluate.yaml scores the pruned file on the same test split: the same accuracy as the prune run's
    bundle_run(
        "brain_mri_3d", ["train_teacher.yaml", "evaluate.yaml"], tmp_path, env,
        "--network", f"$monai_kdx.pruning.load_pruned({str(pruned_file)!r}).to(@device)",
        "--handlers#0#_disabled_", "True", "--run_name", "evaluate_pruned",
    )  # fmt: skip
    evaluated = run_summary(uri, latest_run(uri, "brain_mri_3d", "evaluate_pruned"))
    assert evaluated["metrics"]["test_accuracy"] == pytest.approx(metrics["test_accuracy"])


@pytest.mark.slow
def test_brain_mri_3d_prune_the_distilled_student(brain_teacher):
    tmp_path, env, uri = brain_teacher
    env = _one_thread(env)
    if not (tmp_path / "runs" / "student" / "model.pt").exists():
        bundle_run("brain_mri_3d", ["train_teacher.yaml", "distill.yaml"], tmp_path, env)
    bundle_run("brain_mri_3d", ["train_teacher.yaml", "prune.yaml"], tmp_path, env, "--prune_method", "magnitude",
               "--prune_ratio", "0.25", "--run_name", "prune_student")  # fmt: skip
    run = run_summary(uri, latest_run(uri, "brain_mri_3d", "prune_student"))
    assert run["params"]["prune_source"] == "student" and run["params"]["network"] == "ShallowCNN"
    assert run["metrics"]["prune_params"] < run["metrics"]["prune_params_before"]
    loaded = _load_fresh(tmp_path / "runs" / "pruned" / "model_pruned.pt", (32, 32, 32), env)
    assert loaded["type"] == "ShallowCNN" and loaded["params"] == run["metrics"]["prune_params"]


@pytest.mark.slow
def test_chest_xray_2d_prune_teacher(tmp_path, subprocess_env):
    env = _one_thread(subprocess_env)
    bundle_run("chest_xray_2d", ["train_teacher.yaml"], tmp_path, env)
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlruns.db'}"
    bundle_run("chest_xray_2d", ["train_teacher.yaml", "prune.yaml"], tmp_path, env, "--prune_source", "teacher",
               "--prune_method", "taylor")  # fmt: skip
    run = run_summary(uri, latest_run(uri, "chest_xray_2d", "prune"))
    assert run["metrics"]["prune_params"] < 0.5 * run["metrics"]["prune_params_before"]
    assert "test_accuracy" in run["metrics"] and "model_pruned.pt" in run["artifacts"]
    loaded = _load_fresh(tmp_path / "runs" / "pruned" / "model_pruned.pt", (32, 32), env)
    assert loaded["out"] == [1, 3] and loaded["params"] == run["metrics"]["prune_params"]


def test_prune_configs_differ_only_by_bundle_name():
    """spatial_dims and the architectures come from train_teacher.yaml: prune.yaml is the same in both bundles."""
    brain = (REPO / "bundles" / "brain_mri_3d" / "configs" / "prune.yaml").read_text()
    chest = (REPO / "bundles" / "chest_xray_2d" / "configs" / "prune.yaml").read_text()
    assert brain.replace("brain_mri_3d", "chest_xray_2d") == chest


@pytest.mark.slow
def test_pruning_benchmarks_quick_write_json_table_and_plot(tmp_path, subprocess_env):
    runner = str(REPO / "benchmarks" / "run.py")
    done = subprocess.run(
        [sys.executable, runner, "pruning_latency", "pruning_accuracy", "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, env=_one_thread(subprocess_env), timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    latency = json.loads((tmp_path / "pruning_latency.json").read_text())
    row = latency["rows"]["densenet121_teacher"]["32"]
    assert row["pruned_ms"] > 0 and row["unpruned_ms"] > 0 and latency["ratio_latency_densenet121_teacher_32"] > 0
    assert latency["ratio_params_shallowcnn_student"] < 0.5  # the bundle's student, pruned for real
    assert latency["ratio_macs_densenet121_teacher_32"] < 0.5  # half the channels of both operands of most convs
    accuracy = json.loads((tmp_path / "pruning_accuracy.json").read_text())
    assert {r["method"] for r in accuracy["rows"]} == {"lrp", "ig", "taylor", "magnitude", "random"}
    assert all(r["params"] < accuracy["base_params"] for r in accuracy["rows"])
    table = (tmp_path / "pruning_accuracy.md").read_text()
    assert "| lrp |" in table and "| random |" in table
    assert (tmp_path / "pruning_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
