"""The main job through its real path: `monai-kdx demo --quick` run in stages, an interrupted stage,
resumption without redoing completed stages, the MLflow parent/child runs and registered models read
back, the report, a corrupt stage input, and the same pipeline against a real `mlflow server`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Any

import numpy as np
import pytest
import torch
from conftest import VENV_BIN, bundle_network
from mlflow.tracking import MlflowClient

from monai_kdx.apps.pipeline import Pipeline, check_checkpoint, runner
from monai_kdx.pruning import load_pruned
from monai_kdx.tracking import PARENT_TAG, Tracker, load_classifier, run_summary


def _cli(*args: str, env, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "monai-kdx"), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=900
    )


def _runs_named(uri: str, name: str) -> list:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("brain_mri_3d")
    return client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{name}'")


@pytest.mark.slow
def test_demo_interrupted_then_resumed_tracks_everything(tmp_path, subprocess_env, monkeypatch):
    out = tmp_path / "demo@1"  # an "@" in a path: paths are config data, never pasted into expressions
    uri = f"sqlite:///{out / 'mlruns.db'}"

    # 1. the CLI runs the first two stages
    first = _cli("demo", "--quick", "--out", str(out), "--until", "distill", env=subprocess_env, cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    assert "registered model: models:/brain_mri_3d_student/1" in first.stdout
    # a console a person reads: stage lines and the results; MONAI's logs and warnings in the stages' log files
    console = first.stdout + first.stderr
    assert len(console.splitlines()) < 30 and " - INFO - " not in console and "Warning" not in console, console
    assert "teacher: done in" in first.stdout and "distill: done in" in first.stdout
    assert "SupervisedTrainer - INFO" in (out / "logs" / "teacher.log").read_text()
    assert "DistillationTrainer - INFO" in (out / "logs" / "distill.log").read_text()
    state = json.loads((out / "pipeline.json").read_text())
    assert list(state["stages"]) == ["teacher", "distill"]
    kept = {p: os.stat(out / p).st_mtime_ns for p in ("models/model.pt", "student/model.pt", "dataset_preview.png")}

    # 2. resumed in-process; the prune stage crashes half-way (after its bundle started logging)
    original = runner.STAGE_FUNCTIONS["prune"]

    def crashing(pipeline, run_id):
        MlflowClient(pipeline.tracking_uri).log_metric(run_id, "started", 1.0)
        raise RuntimeError("simulated crash")

    monkeypatch.setitem(runner.STAGE_FUNCTIONS, "prune", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        Pipeline(out, quick=True).run()
    monkeypatch.setitem(runner.STAGE_FUNCTIONS, "prune", original)
    assert "RuntimeError: simulated crash" in (out / "logs" / "prune.log").read_text()  # the traceback is logged
    assert list(json.loads((out / "pipeline.json").read_text())["stages"]) == ["teacher", "distill"]

    # 3. the CLI resumes: teacher and distill are not redone, prune runs again (the later stages: the server test)
    resumed = _cli("demo", "--quick", "--out", str(out), "--until", "prune", env=subprocess_env, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "teacher: completed earlier" in resumed.stdout and "distill: completed earlier" in resumed.stdout
    assert {p: os.stat(out / p).st_mtime_ns for p in kept} == kept
    final = json.loads((out / "pipeline.json").read_text())
    assert list(final["stages"]) == ["teacher", "distill", "prune"]
    assert final["parent_run_id"] == state["parent_run_id"]
    assert {s: final["stages"][s]["run_id"] for s in ("teacher", "distill")} == {
        s: state["stages"][s]["run_id"] for s in ("teacher", "distill")
    }

    # MLflow: one parent, one finished child per stage, the crashed attempt kept as a failed run
    parent = state["parent_run_id"]
    children = {run.info.run_name: run for run in Tracker(uri).child_runs(parent)}
    assert {"teacher", "distill", "prune", "prune (failed)"} == set(children)
    assert children["prune (failed)"].info.status == "FAILED"
    assert all(children[s].info.status == "FINISHED" for s in ("teacher", "distill", "prune"))
    assert len(_runs_named(uri, "teacher")) == 1 and len(_runs_named(uri, "distill")) == 1
    assert MlflowClient(uri).get_run(parent).info.status == "FINISHED"

    # everything a stage produced is in its child run
    teacher = run_summary(uri, children["teacher"])
    assert {"model.pt", "dataset_preview.png", "test_predictions.csv"} <= set(teacher["artifacts"])
    assert {"train_accuracy", "val_accuracy", "test_accuracy"} <= set(teacher["metrics"])
    distill = run_summary(uri, children["distill"])
    assert {"model.pt", "test_predictions.csv"} <= set(distill["artifacts"])
    assert {"train_kd", "train_attention", "test_accuracy"} <= set(distill["metrics"])
    # every model an MLflow logged model of its run, with a signature and an input example, registered
    for run, name in ((teacher, "teacher"), (distill, "student")):
        logged = run["models"][f"{name}_model"]
        assert {"MLmodel", "input_example.json"} <= set(logged["artifacts"]) and logged["tags"]["role"] == name
    prune = run_summary(uri, children["prune"])
    assert {"model_pruned.pt", "model_pruned_report.json"} <= set(prune["artifacts"])
    assert "MLmodel" in prune["models"]["pruned_model"]["artifacts"]
    report = json.loads((out / "pruned" / "model_pruned_report.json").read_text())
    assert report["method"] == "lrp" and report["steps"][0]["accepted"] and report["widths"]
    assert prune["metrics"]["prune_params"] < prune["metrics"]["prune_params_before"]
    parent_summary = run_summary(uri, parent)
    # the parent run: what defines the job and the stages' times, each under one name (no stage's metrics copied)
    assert {f"seconds/{stage}" for stage in ("teacher", "distill", "prune")} == set(parent_summary["metrics"])
    params = parent_summary["params"]
    assert params["teacher_network"] == "DenseNet121" and params["student_network"] == "ShallowCNN"
    assert params["data"] == "generated brain-mri-3d" and params["n_samples"] == "16"

    # the registered pruned student loads back (no pickled module) and predicts like the pruned file
    assert "registered model: models:/brain_mri_3d_student_pruned/1" in resumed.stdout
    model = load_classifier("models:/brain_mri_3d_student_pruned/1", uri)
    x = torch.randn(2, 1, 32, 32, 32)
    reference = load_pruned(out / "pruned" / "model_pruned.pt").eval()
    with torch.no_grad():
        np.testing.assert_allclose(model.predict(x.numpy()), torch.softmax(reference(x), 1).numpy(), atol=1e-5)

    # 4. a stage's output changed since it completed (checksums in pipeline.json): that stage runs again
    (out / "student" / "model.pt").write_bytes(b"truncated")
    again = _cli("demo", "--quick", "--out", str(out), "--until", "distill", env=subprocess_env, cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert "distill: outputs changed since it completed ['student/model.pt'], running it again" in again.stdout
    assert "teacher: completed earlier" in again.stdout
    assert (out / "student" / "model.pt").stat().st_size > 1000
    rerun = json.loads((out / "pipeline.json").read_text())
    assert list(rerun["stages"]) == ["teacher", "distill"]  # what came after it is invalidated
    assert rerun["stages"]["teacher"]["outputs"] == final["stages"]["teacher"]["outputs"]

    # other settings in the same folder are refused
    other = _cli("demo", "--out", str(out), env=subprocess_env, cwd=tmp_path)
    assert other.returncode == 2 and "other settings" in other.stderr


def test_check_checkpoint_names_the_file_and_the_reason(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"stage 'prune' needs the student .*missing.pt: the file does not"):
        check_checkpoint(str(tmp_path / "missing.pt"), "prune", "the student")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"stage 'prune' needs the student: checkpoint '.*empty.pt' is corrupt"):
        check_checkpoint(str(empty), "prune", "the student")
    scalar = tmp_path / "scalar.pt"
    torch.save(torch.tensor(1.0), scalar)
    with pytest.raises(ValueError, match="scalar.pt' holds no state dict of tensors"):
        check_checkpoint(str(scalar), "prune", "the student")
    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.ones(1)}}, good)
    check_checkpoint(str(good), "prune", "the student")
    from monai_kdx.networks import build_network
    from monai_kdx.pruning import save_pruned

    network = build_network({"network": "ShallowCNN", "spatial_dims": 2, "in_channels": 1, "out_channels": 3})
    pruned = save_pruned(network, tmp_path / "pruned.pt")  # the explain stage's input
    check_checkpoint(str(pruned), "explain", "the pruned student")


def test_pipeline_refuses_bad_settings_before_any_work(tmp_path):
    with pytest.raises(FileNotFoundError, match="no bundle 'lung_ct'"):
        Pipeline(tmp_path / "a", bundle="lung_ct")
    with pytest.raises(ValueError, match="unknown stage 'teach'"):
        Pipeline(tmp_path / "b", quick=True).run(until="teach")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ConnectionError, match="unreachable"):
        Pipeline(tmp_path / "c", tracking_uri=f"http://127.0.0.1:{port}")
    assert not (tmp_path / "b" / "data").exists() and not (tmp_path / "c").exists()


@pytest.fixture
def mlflow_server(tmp_path, subprocess_env):
    """A real `mlflow server` on 127.0.0.1 (free port), SQLite backend, proxied artifact storage."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "server.log", "w") as log:
        server = subprocess.Popen(
            [
                str(VENV_BIN / "mlflow"), "server",
                "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                "--artifacts-destination", str(tmp_path / "server-artifacts"),
            ],
            stdout=subprocess.DEVNULL, stderr=log, env=subprocess_env, start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.time() + 120
            while not _healthy(url):
                if server.poll() is not None or time.time() > deadline:
                    pytest.fail(f"mlflow server did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
            yield url, tmp_path
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.mark.slow
def test_a_finished_main_job_read_back_through_a_real_mlflow_server(mlflow_server, subprocess_env):
    """The whole quick job logged to a real `mlflow server` and read back over REST: the runs and their params, one
    name per metric, artifacts stored by the server, the four registered models with their signatures."""
    import mlflow.artifacts
    import yaml

    url, tmp_path = mlflow_server
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "monai_kdx.cli", "demo", "--quick", "--out", str(out), "--tracking-uri", url],
        capture_output=True, text=True, env=subprocess_env, cwd=tmp_path, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert not (out / "mlruns.db").exists() and not (tmp_path / "mlruns").exists()  # nothing stored locally
    state = json.loads((out / "pipeline.json").read_text())
    parent = run_summary(url, state["parent_run_id"])
    children = {run.info.run_name: run for run in Tracker(url).child_runs(state["parent_run_id"])}
    assert set(children) == set(runner.STAGES)
    assert all(run.data.tags[PARENT_TAG] == state["parent_run_id"] for run in children.values())
    runs = {name: run_summary(url, run) for name, run in children.items()}
    assert all(run["artifact_uri"].startswith("mlflow-artifacts:") for run in [parent, *runs.values()])
    assert any((tmp_path / "server-artifacts").rglob("report.md"))  # the server's artifact store holds them

    # params: what defines each run
    assert parent["params"]["student_network"] == "ShallowCNN" and parent["params"]["bundle"] == "brain_mri_3d"
    distill_params = runs["distill"]["params"]
    assert distill_params["student"] == "ShallowCNN" and distill_params["teacher"] == "DenseNet121"
    assert runs["teacher"]["params"]["network"] == "DenseNet121" and "max_epochs" in runs["teacher"]["params"]
    # one name per quantity: no stage's metrics copied under a prefix into the parent or the explain run
    assert not [key for key in parent["metrics"] if key.startswith(tuple(f"{stage}_" for stage in runner.STAGES))]
    assert all("/" in key for key in parent["metrics"])  # seconds/<stage>, <model>/<quantity>
    explain_keys = set(runs["explain"]["metrics"])  # its own: the candidates' validation pointing game
    assert explain_keys and all(key.startswith("validation_pointing_game/") for key in explain_keys)
    assert parent["metrics"]["student/test_accuracy"] == pytest.approx(runs["distill"]["metrics"]["test_accuracy"])

    # the four registered models: logged models of their runs, with a signature and an input example
    client = MlflowClient(url)
    versions = {version.name: version for version in client.search_model_versions()}
    stages = {"teacher": "teacher", "student": "distill", "student_pruned": "prune", "student_saliency": "saliency"}
    assert set(versions) == {f"brain_mri_3d_{name}" for name in stages}
    for name, stage in stages.items():
        version = versions[f"brain_mri_3d_{name}"]
        assert version.run_id == children[stage].info.run_id and version.description
        logged = client.get_logged_model(version.source.removeprefix("models:/"))
        meta = mlflow.artifacts.download_artifacts(f"{logged.artifact_location}/MLmodel", tracking_uri=url)
        with open(meta) as stream:
            model_meta = yaml.safe_load(stream)
        assert "tensor" in model_meta["signature"]["inputs"] and model_meta["saved_input_example_info"]
    # the explain stage: one child run per model, maps and figures named after the cases
    explain_children = {run.info.run_name: run for run in Tracker(url).child_runs(children["explain"].info.run_id)}
    assert set(explain_children) == {"explain_teacher", "explain_student", "explain_pruned", "explain_saliency"}
    assert run_summary(url, explain_children["explain_student"])["params"]["network"] == "ShallowCNN"
    assert parent["params"]["explanation_method"] in runner.EXPLANATION_CANDIDATES
    # chosen by the distillation stage; the saliency stage guided that map (a CAM mode itself, integrated gradients
    # through the input gradient), the explain stage explained it
    chosen = state["stages"]["distill"]["explanation"]["method"]
    assert chosen == parent["params"]["explanation_method"]
    guided = runs["saliency"]["params"]["saliency_method"]
    assert guided == (chosen if chosen != "integrated_gradients" else "input_gradient")
    assert {"report/report.md", "report/summary.png", "report/hierarchy.png"} <= set(parent["artifacts"])
    explained = run_summary(url, explain_children["explain_pruned"])
    assert any(a.endswith("_cam.nii.gz") for a in explained["artifacts"])
    # outputs are named after the cases' paths in the dataset folder
    names = set(os.listdir(out / "explanations" / "pruned" / "maps"))
    case = next(name[: -len("_cam.nii.gz")] for name in names if name.endswith("_cam.nii.gz"))
    assert case.startswith("images__case_") and f"{case}_levels.nii.gz" in names
    assert f"figures/{case}_cam.png" in explained["artifacts"] and f"maps/{case}_cam.nii.gz" in explained["artifacts"]
    assert {"pointing_game", "relevance_mass", "deletion_auc", "insertion_auc"} <= set(explained["metrics"])
    # the summary: four models, the pruned one smallest, values measured (finite), the table printed
    rows = {row["model"]: row for row in json.loads((out / "report" / "summary.json").read_text())["rows"]}
    assert list(rows) == ["teacher", "student", "pruned", "saliency", "random map"]
    models = ("teacher", "student", "pruned", "saliency")
    assert rows["pruned"]["params"] < rows["student"]["params"] < rows["teacher"]["params"]
    assert rows["pruned"]["macs_m"] < rows["student"]["macs_m"] < rows["teacher"]["macs_m"]
    assert all(np.isfinite(rows[m]["latency_ms"]) and rows[m]["explain_ms"] > 0 for m in models)
    assert all(-1 <= rows[m]["agreement_teacher"] <= 1 for m in ("student", "pruned", "saliency"))
    # every accuracy, pointing game and agreement with its 95% bootstrap interval and the cases behind it
    for m in models:
        for key in ("test_accuracy", "pointing_game"):
            assert rows[m][f"{key}_low"] <= rows[m][key] <= rows[m][f"{key}_high"] and rows[m][f"{key}_n"] > 0
        assert rows[m]["training"].split()[1] in ("(plateau)", "(cap)", "(budget)")
    assert rows["student"]["agreement_teacher_n"] == rows["teacher"]["test_accuracy_n"]  # every test case
    assert 0 <= rows["random map"]["pointing_game"] <= 1 and "random map" in (out / "report" / "report.md").read_text()
    assert "| pruned |" in result.stdout
    assert (out / "report" / "hierarchy.png").stat().st_size > 10_000

    # the registered student, downloaded over HTTP, predicts like the best checkpoint
    model = load_classifier("models:/brain_mri_3d_student/1", url)
    from monai_kdx.networks import load_weights

    network = load_weights(bundle_network("brain_mri_3d"), str(out / "student" / "model.pt")).eval()
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(model.predict(x.numpy()), torch.softmax(network(x), 1).numpy(), atol=1e-5)


def test_a_second_pipeline_on_the_same_folder_is_refused_naming_the_holder(tmp_path):
    from monai_kdx.apps.pipeline import FolderInUseError, OutputLock

    out = tmp_path / "demo"
    with OutputLock(out):
        with pytest.raises(FolderInUseError, match=f"{out} is in use by pid {os.getpid()} on "):
            Pipeline(out, quick=True).run()
        assert not (out / "data").exists()  # refused before any work
    with OutputLock(out):  # released on exit
        pass


def _timed_as(monkeypatch, teacher: float, student: float) -> dict[str, list]:
    """Make the estimates' timings deterministic: an explanation by the teacher takes ``teacher`` s (integrated
    gradients 4x), by the student ``student`` s; a forward pass a tenth of that; all of it times ``timed["slower"]``.
    Returns what was timed."""
    timed: dict[str, Any] = {"explained": [], "forward": [], "slower": 1.0}

    def unit(spec) -> float:
        return (teacher if spec["network"] == "DenseNet121" else student) * timed["slower"]

    def explanation_seconds(spec, workload, methods, smoothing, device):
        timed["explained"].append((spec["network"], list(methods)))
        return {m: unit(spec) * (4 if m == "integrated_gradients" else 1) for m in methods}

    def step_seconds(spec, batch, classes, train=True):
        timed["forward"].append(spec["network"])
        return unit(spec) / 10

    monkeypatch.setattr(runner, "explanation_seconds", explanation_seconds)
    monkeypatch.setattr(runner, "step_seconds", step_seconds)
    monkeypatch.setattr(runner, "EXPLAIN_OVERHEAD", (0.25, 7.0))
    return timed


def test_a_time_budget_too_small_for_one_epoch_is_refused_before_any_work(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    with pytest.raises(ValueError, match=r"time budget of 0 s is less than the explain stage alone is expected to "):
        Pipeline(out, quick=True, time_budget=0.01).run()
    with pytest.raises(ValueError, match="time budget must be a positive number"):
        Pipeline(tmp_path / "other", quick=True, time_budget=-5)
    assert not (out / "data").exists() and not (out / "pipeline.json").exists()
    _timed_as(monkeypatch, 0.5, 0.1)
    reserve = Pipeline(tmp_path / "probe", quick=True, time_budget=1e6).explain_reserve
    for until in (None, "teacher"):  # the budget covers the whole job: its explain stage is kept aside with --until
        pipeline = Pipeline(out, quick=True, time_budget=reserve + 0.01)
        with pytest.raises(
            ValueError,
            match=rf"leaves stage 'teacher' about 0 s once about {reserve:.0f} s are kept for the explain stage, less "
            r"than one epoch \(about",
        ):
            pipeline.run(until=until)
        assert not (out / "data").exists() and not (out / "pipeline.json").exists()


def test_the_training_stages_share_what_the_explain_stage_leaves(tmp_path, monkeypatch):
    """The explain stage's time is estimated from timed explanations and forward passes (test images x the four
    models, faithfulness curves, the choice on the validation split until it is made) and kept aside; the training
    stages share the rest, the time of the completed stages and of the running one spent."""
    timed = _timed_as(monkeypatch, 0.5, 0.1)
    budgeted = Pipeline(tmp_path / "third", quick=True, time_budget=400.0)
    workload = budgeted.workload
    assert workload.shape == (32, 32, 32) and workload.channels == 1  # the quick settings
    n_test, n_val = workload.counts["test"], workload.counts["validation"]
    assert n_test + n_val + workload.counts["training"] == 16 and n_test > 0 and n_val > 0
    candidates = list(runner.EXPLANATION_CANDIDATES)
    # before the choice: every candidate timed, the dearest (integrated gradients, 4x) for the four models, the
    # teacher's maps by every candidate on the validation cases; the faithfulness curves of every test case (quick:
    # 4 steps, all cases): 4 x 5 forwards a case and model
    choice = n_val * (2.0 + 0.5 * (len(candidates) - 1))
    faithfulness = n_test * 4 * 5 * (0.05 + 3 * 0.01)
    reserve = n_test * (2.0 + 3 * 0.4) + faithfulness + choice + 0.25 * n_test * 4 + 7.0
    assert budgeted.explain_reserve == pytest.approx(reserve)
    # each network timed once: the student, pruned and saliency-guided models share the student's architecture
    assert timed["explained"] == [("DenseNet121", candidates), ("ShallowCNN", candidates)]
    assert timed["forward"] == ["DenseNet121", "ShallowCNN"]
    assert budgeted.stage_budget("teacher") == pytest.approx((400 - reserve) * 0.36 / 0.75)
    # measured again as a training stage starts, unless the estimate is younger than a minute: on a machine now
    # twice as slow, the explanations and curves take twice as long
    budgeted.measure_explain()
    assert len(timed["explained"]) == 2
    timed["slower"], budgeted._reserved_at = 2.0, budgeted._reserved_at - 61
    budgeted.measure_explain()
    assert len(timed["explained"]) == 4
    assert budgeted.explain_reserve == pytest.approx(2 * (reserve - 0.25 * n_test * 4 - 7.0) + 0.25 * n_test * 4 + 7.0)
    timed["slower"] = 1.0
    budgeted.measure_explain(max_age=0.0)
    assert budgeted.explain_reserve == pytest.approx(reserve)
    assert budgeted.stage_budget("explain") is None  # not cut short
    budgeted.state["stages"]["teacher"] = {"seconds": 20.0}
    assert budgeted.stage_budget("distill") == pytest.approx((380 - reserve) * 0.22 / 0.39)
    budgeted._stage_start = time.perf_counter() - 10.0  # 10 s into the running stage
    assert budgeted.stage_budget("distill") == pytest.approx((370 - reserve) * 0.22 / 0.39, abs=0.05)
    budgeted._stage_start = None

    # the distillation stage chooses, then keeps aside the chosen explanation's time alone, without the choice
    chosen = {"method": "layercam", "smoothing": 1.0, "scores": {}}
    monkeypatch.setattr(runner, "_choose_explanation", lambda pipeline: chosen)
    monkeypatch.setattr(runner, "_train_and_test", lambda pipeline, run_id, entry, **extra: {"extra": extra})
    record = runner._stage_distill(budgeted, "run")
    assert record["explanation"] == chosen
    layercam = n_test * (0.5 + 3 * 0.1) + faithfulness + 0.25 * n_test * 4 + 7.0
    assert timed["explained"][-2:] == [("DenseNet121", ["layercam"]), ("ShallowCNN", ["layercam"])]
    assert budgeted.explain_reserve == pytest.approx(layercam)
    # resumed after the distillation stage: its recorded choice is what the explain stage will show
    budgeted.state["stages"]["distill"] = {"seconds": 10.0, "explanation": chosen}
    budgeted.state["stages"]["prune"] = {"seconds": 30.0}
    resumed = Pipeline(tmp_path / "third", quick=True, time_budget=400.0)
    resumed.state = budgeted.state
    assert resumed.explain_reserve == pytest.approx(layercam)
    assert timed["explained"][-2:] == [("DenseNet121", ["layercam"]), ("ShallowCNN", ["layercam"])]
    # the saliency stage guides the chosen explanation
    assert runner._stage_saliency(budgeted, "run")["extra"]["saliency_method"] == "layercam"
    # a stage the data does not allow takes no share: pruning, the last training stage, gets all that is left
    del budgeted.state["stages"]["prune"]
    budgeted.skipped_stages["saliency"] = "no gaze, no masks"
    assert budgeted.stage_budget("prune") == pytest.approx(400 - 20 - 10 - budgeted.explain_reserve)
    # when the time is gone, 1 s: the bundles' min_epochs still run (tests/test_training_budget.py)
    budgeted.state["stages"]["distill"]["seconds"] = 1000.0
    assert budgeted.stage_budget("prune") == 1.0


def test_the_saliency_stage_guides_a_loss_it_can_compute_for_every_candidate_explanation():
    """Every explanation the main job may choose maps to a saliency the saliency losses compute: a CAM mode and LRP
    to themselves, integrated gradients to the input gradient."""
    from monai_kdx.losses import SaliencyAlignmentLoss

    guided = {method: runner._guided_saliency(method) for method in (*runner.EXPLANATION_CANDIDATES, "lrp")}
    assert guided == {
        "layercam": "layercam",
        "gradcam": "gradcam",
        "gradcam++": "gradcam++",
        "activation": "activation",
        "integrated_gradients": "input_gradient",
        "lrp": "lrp",
    }
    for method in guided.values():
        assert SaliencyAlignmentLoss("stages", method=method, divergence="cc").method == method
