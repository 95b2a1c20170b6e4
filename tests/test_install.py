"""The installed environment: console script, zennit import without torchvision, pinned torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import REPO, VENV_BIN


def test_console_script_is_installed(subprocess_env):
    result = subprocess.run(
        [str(VENV_BIN / "monai-kdx"), "--help"], capture_output=True, text=True, env=subprocess_env, check=True
    )
    assert "make-dataset" in result.stdout and "demo" in result.stdout


def test_zennit_imports_and_placeholder_does_not_leak(subprocess_env):
    code = textwrap.dedent(
        """
        import importlib, sys, torch
        from torch import nn
        from monai_kdx.explain import import_zennit
        zennit = import_zennit()
        from zennit.attribution import Gradient
        from zennit.composites import EpsilonPlusFlat
        print(any(name.startswith("torchvision") for name in sys.modules))
        try:
            import torchvision  # a real, working torchvision is fine; the placeholder must be gone
            print(hasattr(torchvision, "__version__"))
        except Exception:
            print(True)
        net = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 27, 2))
        x = torch.rand(1, 1, 3, 3, 3)
        with Gradient(model=net, composite=EpsilonPlusFlat()) as attributor:
            out, relevance = attributor(x, torch.eye(2)[[1]])
        print(tuple(relevance.shape), bool(relevance.abs().sum() > 0))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:3] == ["False", "True", "(1, 1, 3, 3, 3) True"]


def test_constraints_pin_torch_and_mlflow():
    pins = dict(
        line.split("==", 1) for line in (REPO / "constraints.txt").read_text().splitlines()
        if "==" in line and ";" not in line
    )
    import mlflow
    import torch

    assert pins["torch"] == "2.13.0" and torch.__version__.split("+")[0] == pins["torch"]
    assert pins["mlflow"] == "3.17.2" == mlflow.__version__
