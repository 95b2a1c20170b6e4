"""The benchmark runner writes JSON with ratios (timings themselves are never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO

RUNNER = str(REPO / "benchmarks" / "run.py")


def run_quick(name: str, out, env) -> dict:
    """Run one benchmark with ``--quick`` in a subprocess; return the JSON it wrote to ``out``."""
    done = subprocess.run(
        [sys.executable, RUNNER, name, "--quick", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / f"{name}.json").read_text())


def test_runner_writes_json_with_ratios_and_rejects_unknown_names(tmp_path, subprocess_env):
    result = run_quick("teacher_throughput", tmp_path, subprocess_env)
    assert result["benchmark"] == "teacher_throughput" and result["quick"] is True
    assert result["train_volumes_per_s"] > 0 and result["inference_volumes_per_s"] > 0
    ratio = result["inference_volumes_per_s"] / result["train_volumes_per_s"]
    assert abs(result["ratio_train_step_to_inference"] - ratio) < 1e-9
    bad = subprocess.run([sys.executable, RUNNER, "nope"], capture_output=True, text=True, env=subprocess_env)
    assert bad.returncode == 2 and "nope" in bad.stderr and "import_time" in bad.stderr


def test_distillation_accuracy_quick_runs_the_bundles_and_reports_both_checkpoints(tmp_path, subprocess_env):
    result = run_quick("distillation_accuracy", tmp_path, subprocess_env)
    rows = result["rows"]
    assert set(rows) == {"teacher", "kd_student", "scratch_student"}
    for row in rows.values():  # each run tested on its best and on its final checkpoint
        for key in ("test_accuracy_per_seed", "final_test_accuracy_per_seed"):
            assert len(row[key]) == 1 and all(0.0 <= value <= 1.0 for value in row[key].values())
        assert row["test_accuracy"] == next(iter(row["test_accuracy_per_seed"].values()))
    assert rows["teacher"]["params"] > rows["kd_student"]["params"] == rows["scratch_student"]["params"]
    for key, ratio in (("test_accuracy", "accuracy"), ("final_test_accuracy", "final_accuracy")):  # best, final
        difference = rows["kd_student"][key] - rows["scratch_student"][key]
        assert abs(result[f"ratio_kd_minus_scratch_{ratio}"] - difference) < 1e-9
    assert result["teacher_epochs"] == result["student_epochs"] == 1 and result["seeds"] == [0]
    for ratio, method in (("explanation", "activation_maps"), ("gradcam", "gradcam_per_stage")):  # both kinds timed
        teacher, student = rows["teacher"]["explanation_s"][method], rows["kd_student"]["explanation_s"][method]
        assert min(teacher, student) > 0
        assert abs(result[f"ratio_teacher_to_student_{ratio}_time"] - teacher / student) < 1e-9


def test_saliency_alignment_quick_trains_the_bundles_student_in_both_arms(tmp_path, subprocess_env):
    """Both arms train the bundle's own student (the benchmark once loaded a different architecture) and are scored
    with the saliency the guided arm was trained on (saliency_train.yaml's method and layers)."""
    from monai_kdx.apps.pipeline import bundle_parser

    result = run_quick("saliency_alignment", tmp_path, subprocess_env)
    for bundle, run in result["runs"].items():
        parser = bundle_parser(bundle, ["train_teacher.yaml", "saliency_train.yaml"])
        assert run["student_def"] == parser.get_parsed_content("student_def")
        assert run["guidance"]["saliency_method"] == parser.get_parsed_content("saliency_method")
        for arm in ("plain", "guided"):
            assert 0.0 <= run[arm]["accuracy"] <= 1.0 and run[arm]["kl"] > 0 and -1.0 <= run[arm]["cc"] <= 1.0
        dims = 3 if "3d" in bundle else 2
        assert result[f"ratio_kl_guided_to_plain_{dims}d"] == run["guided"]["kl"] / run["plain"]["kl"]
    assert "| brain_mri_3d" in (tmp_path / "saliency_alignment.md").read_text()
