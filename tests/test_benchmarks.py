"""The benchmark runner writes JSON with ratios (timings themselves are never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_runner_writes_json_with_ratios_and_rejects_unknown_names(tmp_path, subprocess_env):
    runner = str(REPO / "benchmarks" / "run.py")
    done = subprocess.run(
        [sys.executable, runner, "teacher_throughput", "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, env=subprocess_env, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "teacher_throughput.json").read_text())
    assert result["benchmark"] == "teacher_throughput" and result["quick"] is True
    assert result["train_volumes_per_s"] > 0 and result["inference_volumes_per_s"] > 0
    ratio = result["inference_volumes_per_s"] / result["train_volumes_per_s"]
    assert abs(result["ratio_train_step_to_inference"] - ratio) < 1e-9
    bad = subprocess.run([sys.executable, runner, "nope"], capture_output=True, text=True, env=subprocess_env)
    assert bad.returncode == 2 and "nope" in bad.stderr and "import_time" in bad.stderr
