"""`monai-kdx run --datalist`: the main job on a datalist it has never seen (its own nested folder layout, other file
names, no gaze), through the real CLI, in 3D and 2D; bad datalists refused in one line before any work."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import bundle_run
from mlflow.tracking import MlflowClient

from monai_kdx.cli import main
from monai_kdx.data import write_dataset
from monai_kdx.data.dicom import write_dicom_series
from monai_kdx.data.synthetic import class_names

SPLITS = {3: (0.45, 0.15, 0.4), 2: (0.65, 0.15, 0.2)}  # the bundles' own split fractions
KINDS = {3: "brain-mri-3d", 2: "chest-xray-2d"}


def _own_layout(tmp_path: Path, dims: int, n: int = 16, dicom: bool = False, masks: bool = True) -> Path:
    """A generated dataset rewritten as a user would hold it: patients/<site>/<id>/scan.nii.gz + lesion.nii.gz,
    every scan named alike, no gaze, the datalist elsewhere than the data; with ``dicom``, each scan a DICOM series
    folder patients/<site>/<id>/scan/ (real DICOM files written with pydicom, the NIfTI's voxel size); without
    ``masks``, no lesion masks either (labels only)."""
    source = write_dataset(
        tmp_path / "generated", kind=KINDS[dims], n=n, seed=0, progress=False, split_fractions=SPLITS[dims],
        spatial_size=32,
    )  # fmt: skip
    content = json.loads(source.read_text())
    root = tmp_path / "hospital"
    datalist: dict[str, list[dict]] = {}
    for section in ("training", "validation", "test"):
        datalist[section] = []
        for index, entry in enumerate(content[section]):
            case = root / "patients" / f"site{index % 2}" / f"{section[:3]}{index:03d}"
            case.mkdir(parents=True)
            shutil.copy(source.parent / entry["mask"], case / "lesion.nii.gz")
            relative = case.relative_to(root)
            image = f"{relative}/scan" if dicom else f"{relative}/scan.nii.gz"
            if dicom:
                scan = nib.load(source.parent / entry["image"])
                origin = (-90.0 + index, 120.0, -60.0)  # patient LPS, in mm; each patient positioned differently
                write_dicom_series(scan.get_fdata(), root / image, scan.header.get_zooms()[:3], origin, case.name)
            else:
                shutil.copy(source.parent / entry["image"], case / "scan.nii.gz")
            datalist[section].append({"image": image, "label": entry["label"]})
            if masks:
                datalist[section][-1]["mask"] = f"{relative}/lesion.nii.gz"
    shutil.rmtree(tmp_path / "generated")
    path = root / "my_datalist.json"
    path.write_text(json.dumps(datalist, indent=1))
    return path


def _cli(*arguments: str, env, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "monai_kdx.cli", *arguments], capture_output=True, text=True, env=env, cwd=cwd,
        timeout=600,
    )  # fmt: skip


@pytest.mark.slow
def test_bundle_explains_dicom_series_with_heatmaps_on_their_geometry(tmp_path, brain_teacher):
    """Datalist images that are DICOM series folders: explain.yaml explains them (the session's tiny teacher) and the
    heatmaps (NIfTI) carry each series' spacing, orientation and position, as MONAI reads the series (training on
    DICOM: the 3D main-job test below)."""
    from monai.transforms import LoadImage

    from monai_kdx.transforms import case_name

    datalist = _own_layout(tmp_path, 3, dicom=True)
    content = json.loads(datalist.read_text())
    assert (datalist.parent / content["test"][0]["image"] / "slice_0000.dcm").is_file()
    teacher_folder, env, _ = brain_teacher
    checkpoint = teacher_folder / "runs" / "models" / "model.pt"
    settings = ("--datalist", str(datalist), "--ckpt_path", str(checkpoint), "--faithfulness_steps", "2")
    bundle_run("brain_mri_3d", ["train_teacher.yaml", "explain.yaml"], tmp_path, env, *settings)
    maps = tmp_path / "runs" / "explanations" / "maps"
    for entry in content["test"]:
        series = datalist.parent / entry["image"]
        read = LoadImage(image_only=True)(str(series))  # MONAI's reading of the series: the geometry to match
        heatmap = nib.load(maps / f"{case_name(series, datalist.parent)}_cam.nii.gz")
        assert heatmap.shape[:3] == tuple(read.shape)
        np.testing.assert_allclose(heatmap.affine, np.asarray(read.affine), atol=1e-4)
        assert not np.allclose(heatmap.affine, np.eye(4))  # a real geometry: 6 mm voxels, flipped axes, an origin


@pytest.mark.slow
def test_run_on_a_users_3d_datalist_picks_the_3d_bundle_and_trains_on_its_files(tmp_path, subprocess_env):
    """3D DICOM series up to the teacher (the stages after it run the same code as in 2D, below)."""
    datalist = _own_layout(tmp_path, 3, dicom=True)
    out = tmp_path / "out"
    arguments = ("run", "--datalist", str(datalist), "--quick", "--out", str(out), "--until", "teacher")
    done = _cli(*arguments, env=subprocess_env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    state = json.loads((out / "pipeline.json").read_text())
    assert list(state["stages"]) == ["teacher"] and state["settings"]["bundle"] == "brain_mri_3d"
    assert state["stages"]["teacher"]["metrics"]["test_accuracy"] >= 0.0
    assert not (out / "data").exists()  # nothing generated: the user's files were read
    client = MlflowClient(f"sqlite:///{out / 'mlruns.db'}")
    (pipeline,) = client.search_runs(
        [client.get_experiment_by_name("brain_mri_3d").experiment_id], "attributes.run_name = 'pipeline'"
    )
    assert pipeline.data.params["data"] == str(datalist) and pipeline.data.params["num_classes"] == "4"


@pytest.mark.slow
def test_run_on_a_users_datalist_gives_the_demos_stages_report_and_runs(tmp_path, subprocess_env):
    dims = 2
    datalist = _own_layout(tmp_path, dims)
    out = tmp_path / "out"
    done = _cli("run", "--datalist", str(datalist), "--quick", "--out", str(out), env=subprocess_env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    bundle = "chest_xray_2d"  # chosen by the data's dimensionality
    state = json.loads((out / "pipeline.json").read_text())
    assert list(state["stages"]) == ["teacher", "distill", "prune", "saliency", "explain"]
    assert state["settings"]["bundle"] == bundle
    assert not (out / "data").exists()  # nothing generated: the user's files were read

    report = (out / "report" / "report.md").read_text()
    for row in ("| teacher |", "| student |", "| pruned |", "| saliency |", "| random map |"):
        assert row in report
    assert f"Data: `{datalist}`, {len(class_names(KINDS[dims]))} classes, {dims}D" in report
    assert "pulled toward the lesion masks" in report
    rows = json.loads((out / "report" / "summary.json").read_text())["rows"]
    assert all(row.get("gaze_kl") is None for row in rows)  # no gaze in the datalist: not scored
    # outputs named after each case's folder: the scans all share one file name and none overwrote another
    test_cases = json.loads(datalist.read_text())["test"]
    cams = [p.name for p in (out / "explanations" / "student").rglob("*.nii.gz") if "cam" in p.name]
    assert len(cams) == len(test_cases)
    for case in test_cases:
        assert sum(Path(case["image"]).parent.name in name for name in cams) == 1, (case, cams)

    client = MlflowClient(f"sqlite:///{out / 'mlruns.db'}")
    experiment = client.get_experiment_by_name(bundle)
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    assert {"pipeline", "teacher", "distill", "prune", "saliency", "explain"} <= set(runs)
    assert all(runs[name].info.status == "FINISHED" for name in ("pipeline", "saliency", "explain"))
    assert runs["pipeline"].data.params["data"] == str(datalist)
    assert runs["pipeline"].data.params["num_classes"] == str(len(class_names(KINDS[dims])))
    assert runs["saliency"].data.params["saliency_target"] == "mask"  # guided toward the masks: no gaze
    # the same MLflow structure as the demo: the four models registered, each with its signature
    versions = {version.name: version for version in client.search_model_versions()}
    names = ("teacher", "student", "student_pruned", "student_saliency")
    assert set(versions) == {f"{bundle}_{name}" for name in names}
    for version in versions.values():
        model = client.get_logged_model(version.source.removeprefix("models:/"))
        assert model.source_run_id == version.run_id and version.description
        assert model.params["input_shape"] == "(1, 32, 32)"  # logged with the signature and input example


@pytest.mark.slow
def test_run_on_labels_alone_of_several_shapes_skips_what_needs_masks_and_says_so(tmp_path, subprocess_env):
    """No gaze, no lesion masks, images of two shapes: --spatial-size resamples them, the saliency stage is skipped,
    localization is not scored, the report says why."""
    datalist = _own_layout(tmp_path, 2, n=12, masks=False)
    content = json.loads(datalist.read_text())
    content["training"][0].update(_bigger_scan(datalist.parent, content["training"][0], ("image",)))
    datalist.write_text(json.dumps(content))
    out = tmp_path / "out"
    arguments = ("run", "--datalist", str(datalist), "--quick", "--out", str(out), "--spatial-size", "32")
    assert main(arguments[:-2]) == 2  # two shapes: refused without --spatial-size, before any work
    assert not out.exists()
    done = _cli(*arguments, env=subprocess_env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads((out / "pipeline.json").read_text())["settings"]["overrides"]["resize_to"] == "32"
    assert "saliency: skipped, the datalist has neither gaze heatmaps nor lesion masks" in done.stdout
    state = json.loads((out / "pipeline.json").read_text())
    assert "skipped" in state["stages"]["saliency"] and not (out / "saliency").exists()
    report = (out / "report" / "report.md").read_text()
    assert "Not run: the saliency stage" in report and "localization is not scored" in report
    assert "| saliency |" not in report and "the bundle's default" in report
    rows = {row["model"]: row for row in json.loads((out / "report" / "summary.json").read_text())["rows"]}
    assert list(rows) == ["teacher", "student", "pruned", "random map"]
    assert all("pointing_game" not in row and row["deletion_auc"] is not None for row in rows.values())
    client = MlflowClient(f"sqlite:///{out / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("chest_xray_2d").experiment_id
    (explained,) = client.search_runs([experiment], "attributes.run_name = 'explain_student'")
    assert "pointing_game" not in explained.data.metrics and "deletion_auc" in explained.data.metrics
    assert len(client.search_registered_models()) == 3


def test_the_time_budget_is_estimated_on_the_users_images_and_splits(tmp_path, monkeypatch):
    """The epochs and the explain stage are estimated on the datalist's own image shape (or --spatial-size),
    channels and splits; without lesion masks nothing is chosen, the bundle's explanation alone is timed."""
    from monai_kdx.apps.pipeline import Pipeline, runner

    datalist = _own_layout(tmp_path, 2, n=12)
    content = json.loads(datalist.read_text())
    workload = Pipeline(tmp_path / "a", datalist=str(datalist)).workload
    assert workload.shape == (32, 32) and workload.channels == 1
    assert workload.counts == {section: len(content[section]) for section in ("training", "validation", "test")}
    assert Pipeline(tmp_path / "b", datalist=str(datalist), resize_to=24).workload.shape == (24, 24)

    timed = []
    monkeypatch.setattr(runner, "explanation_seconds", lambda spec, w, methods, s, device: timed.append(methods) or {
        method: 1.0 for method in methods
    })  # fmt: skip
    monkeypatch.setattr(runner, "step_seconds", lambda spec, batch, classes, train: 0.0)
    labels_only = _own_layout(tmp_path / "labels", 2, n=12, masks=False)
    pipeline = Pipeline(tmp_path / "c", datalist=str(labels_only))
    per_case, fixed = runner.EXPLAIN_OVERHEAD
    n_test = len(content["test"])
    assert pipeline.explain_reserve == pytest.approx(n_test * 3 * 1.0 + per_case * n_test * 3 + fixed)
    assert timed == [["layercam"], ["layercam"]]  # teacher and student; three models: no saliency stage


def test_bad_datalists_are_refused_in_one_line_before_any_work(tmp_path, capsys):
    datalist = _own_layout(tmp_path, 2, n=12)
    content = json.loads(datalist.read_text())
    out = tmp_path / "out"

    def refused(edit, words: str, *extra: str) -> None:
        edited = json.loads(json.dumps(content))
        edit(edited)
        path = datalist.parent / "edited.json"
        path.write_text(json.dumps(edited))
        assert main(["run", "--datalist", str(path), "--out", str(out), *extra]) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and words in error[0], error
        assert not out.exists()

    no_mask = "test entry 0 (patients/site0/tes000/scan.nii.gz): has no 'mask' (a lesion mask, as other entries have"
    refused(lambda c: c["test"][0].pop("mask"), no_mask)
    refused(lambda c: c["training"][0].update(label=7.5), "training entry 0")
    refused(lambda c: c["validation"][0].update(image="patients/nowhere/scan.nii.gz"), "validation entry 0")
    refused(lambda c: None, "its images are 2D, the bundle 'brain_mri_3d' is for 3D data", "--bundle", "brain_mri_3d")
    refused(lambda c: c.pop("test"), "the 'test' section is missing or empty")
    refused(lambda c: c["training"][0].update(_bigger_scan(datalist.parent, c["training"][0])), "--spatial-size N")


def _bigger_scan(root: Path, entry: dict, keys: tuple[str, ...] = ("image", "mask")) -> dict:
    """The entry's scan and mask upsampled to 40 x 40 pixels, as new files: a datalist of two image shapes."""
    updated = {}
    for key in keys:
        source = nib.load(root / entry[key])
        data = np.kron(np.asarray(source.dataobj)[:20, :20], np.ones((2, 2)))  # 40 x 40
        path = root / "bigger" / Path(entry[key]).name
        path.parent.mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(data.astype(source.get_data_dtype()), source.affine), path)
        updated[key] = str(path.relative_to(root))
    return updated
