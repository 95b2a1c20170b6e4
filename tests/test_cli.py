"""The monai-kdx console script: make-dataset through real files (the demo: tests/test_pipeline.py)."""

from __future__ import annotations

import json
import subprocess

from conftest import VENV_BIN


def _cli(*args: str, env, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "monai-kdx"), *args], capture_output=True, text=True, env=env, cwd=cwd)


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
