"""Every tutorial runs in quick mode, so none rots; each one's key printed result is checked as well."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest
from conftest import REPO

TUTORIALS = sorted((REPO / "tutorials").glob("*.py"))
NUMBER = r"(-?\d+(?:\.\d+)?|nan|inf)"


def _numbers(pattern: str, text: str) -> list[float]:
    """The numbers captured by ``pattern`` (thousands separators removed); fails when the line is missing."""
    match = re.search(pattern, text)
    assert match, f"no line matching {pattern!r} in:\n{text[-3000:]}"
    return [float(group.replace(",", "")) for group in match.groups()]


def _check_distillation(stdout: str) -> None:
    teacher, student = _numbers(r"parameters: teacher ([\d,]+), student ([\d,]+)", stdout)
    assert student < teacher
    teacher_macs, student_macs = _numbers(r"MACs per 32³ volume: teacher ([\d,]+), student ([\d,]+)", stdout)
    assert student_macs < teacher_macs
    # every part of the distillation loss reached engine.state.output, finite, and the total is their sum
    task, kd, attention, total = _numbers(
        rf"distillation epoch 1: task {NUMBER}, kd {NUMBER}, attention {NUMBER}, loss {NUMBER}", stdout
    )
    assert all(math.isfinite(v) for v in (task, kd, attention, total))
    assert total == pytest.approx(task + kd + attention, abs=3e-3)  # the parts come weighted
    for accuracy in _numbers(rf"test accuracy: teacher {NUMBER}, student {NUMBER}", stdout):
        assert 0.0 <= accuracy <= 1.0


def _check_pruning(stdout: str) -> None:
    assert "outputs match after reload: True" in stdout
    before, after = _numbers(r"parameters: ([\d,]+) -> ([\d,]+)", stdout)
    assert after < before
    macs_before, macs_after = _numbers(r"MACs: ([\d,]+) -> ([\d,]+)", stdout)
    assert macs_after < macs_before
    params_2d, pruned_2d = _numbers(r"2D: RelevancePruningHandler .*parameters ([\d,]+) -> ([\d,]+)", stdout)
    assert pruned_2d < params_2d


def _check_saliency(stdout: str) -> None:
    untrained, plain, guided = _numbers(
        rf"NSS to gaze: untrained {NUMBER}, plain {NUMBER}, saliency-guided {NUMBER}", stdout
    )
    assert all(math.isfinite(v) for v in (untrained, plain, guided))
    assert guided > untrained  # training toward the gaze moves the Grad-CAM onto the fixations
    losses = re.search(r"saliency loss per epoch .*: (.+)", stdout)
    assert losses and all(math.isfinite(float(v)) for v in losses.group(1).split(", "))
    (difference,) = _numbers(r"gaze rendered from the fixations vs the stored map: max difference (\S+)", stdout)
    assert difference < 1e-4  # GazeToHeatmapd reproduces the dataset's stored gaze heatmap


def _check_explanations(stdout: str) -> None:
    rows = re.findall(rf"^\s+(\S.*?)\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}$", stdout, re.MULTILINE)
    methods = {row[0] for row in rows}
    assert {"Grad-CAM++ fused", "integrated_gradients", "occlusion", "lrp", "concept map blocks.1"} <= methods
    assert sum(name.startswith("Grad-CAM++ blocks.") for name in methods) == 4  # one map per level
    for row in rows:  # pointing game, relevance mass, deletion and insertion AUC all lie in [0, 1]
        assert all(0.0 <= float(value) <= 1.0 for value in row[1:]), row
    assert re.search(r"TCAV 'lesion texture' for '\w+' .*blocks\.1 " + NUMBER, stdout)


CHECKS = {
    "02_": _check_distillation,
    "03_": _check_pruning,
    "04_": _check_saliency,
    "05_": _check_explanations,
}


@pytest.mark.slow
@pytest.mark.parametrize("script", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs_quick(script, tmp_path, subprocess_env):
    result = subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, env=subprocess_env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    pngs = list(tmp_path.glob("*.png"))
    assert pngs and all(p.stat().st_size > 10_000 for p in pngs)
    if script.stem.startswith("01_"):
        assert "affine preserved: True" in result.stdout
    for prefix, check in CHECKS.items():
        if script.stem.startswith(prefix):
            check(result.stdout)
