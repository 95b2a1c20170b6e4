"""The monai-kdx console script: the main job in quick mode, and make-dataset through real files."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import VENV_BIN

from monai_kdx.tracking import latest_run, run_summary


def _cli(*args: str, env, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "monai-kdx"), *args], capture_output=True, text=True, env=env, cwd=cwd)


@pytest.mark.slow
def test_demo_quick_trains_evaluates_and_reports_the_mlflow_run(tmp_path, subprocess_env):
    result = _cli("demo", "--quick", "--out", "demo", env=subprocess_env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("teacher test accuracy:"))
    accuracy = float(line.split(":")[1])
    uri = f"sqlite:///{tmp_path / 'demo' / 'mlruns.db'}"
    assert uri in result.stdout
    evaluated = run_summary(uri, latest_run(uri, "brain_mri_3d", "evaluate_teacher"))
    assert evaluated["metrics"]["test_accuracy"] == pytest.approx(accuracy, abs=1e-4)
    trained = run_summary(uri, latest_run(uri, "brain_mri_3d", "train_teacher"))
    assert trained["params"]["spatial_size"] == "32"
    assert {"model_final.pt", "dataset_preview.png"} <= set(trained["artifacts"])
    assert (tmp_path / "demo" / "data" / "brain_mri_3d" / "datalist.json").is_file()


def test_make_dataset_writes_then_refuses_a_different_dataset(tmp_path, subprocess_env):
    out = tmp_path / "retina"
    made = _cli("make-dataset", "--kind", "retina-2d", "--out", str(out), "--n", "6", "--seed", "3",
                "--spatial-size", "48", env=subprocess_env, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    datalist = json.loads((out / "datalist.json").read_text())
    assert sum(len(datalist[s]) for s in ("training", "validation", "test")) == 6
    files_before = sorted(p.name for p in out.rglob("*"))

    again = _cli("make-dataset", "--kind", "retina-2d", "--out", str(out), "--n", "6", "--seed", "4",
                 "--spatial-size", "48", env=subprocess_env, cwd=tmp_path)
    assert again.returncode == 2 and "error" in again.stderr.lower()
    assert sorted(p.name for p in out.rglob("*")) == files_before

    unknown = _cli("make-dataset", "--kind", "ct-9d", "--out", str(tmp_path / "x"), env=subprocess_env, cwd=tmp_path)
    assert unknown.returncode == 2 and "ct-9d" in unknown.stderr and "brain-mri-3d" in unknown.stderr
    assert not (tmp_path / "x").exists()
