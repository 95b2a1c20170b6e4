"""Every tutorial runs in quick mode, so none rots."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO

TUTORIALS = sorted((REPO / "tutorials").glob("*.py"))


@pytest.mark.slow
@pytest.mark.parametrize("script", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs_quick(script, tmp_path, subprocess_env):
    result = subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, env=subprocess_env, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    pngs = list(tmp_path.glob("*.png"))
    assert pngs and all(p.stat().st_size > 10_000 for p in pngs)
    if script.stem.startswith("01_"):
        assert "affine preserved: True" in result.stdout
