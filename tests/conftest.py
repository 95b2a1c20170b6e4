"""Shared test settings (no MLflow telemetry) and the bundle-run helpers shared by the bundle tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


@pytest.fixture
def one_thread():
    """One torch thread for the test, restored after it: on the shared 2-core machines, OpenMP threads
    waiting on a busy core make small convolutions many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    """Environment for child processes: the venv's bin first, telemetry off, unbuffered output."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env["PYTHONUNBUFFERED"] = "1"
    return env


TINY = ["--n_samples", "12", "--spatial_size", "32", "--max_epochs", "2", "--patience", "2", "--batch_size", "4",
        "--faithfulness_steps", "4"]  # fmt: skip


def bundle_run(
    bundle: str, configs: list[str], tmp_path, env, *extra: str, launcher: tuple[str, ...] = (sys.executable, "-m")
) -> subprocess.CompletedProcess:
    """`<launcher> monai.bundle run` on tiny settings, outputs and data under ``tmp_path``; asserts success."""
    root = REPO / "bundles" / bundle
    files = [str(root / "configs" / name) for name in configs]
    command = [
        *launcher, "monai.bundle", "run",
        "--config_file", files[0] if len(files) == 1 else repr(files),
        "--meta_file", str(root / "configs" / "metadata.json"),
        "--logging_file", str(root / "configs" / "logging.conf"),
        "--bundle_root", str(root),
        "--output_dir", str(tmp_path / "runs"),
        "--dataset_dir", str(tmp_path / "data"),
        *TINY, *extra,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="session")
def brain_teacher(tmp_path_factory):
    """One tiny 3D teacher trained and evaluated through the real bundle, shared by every bundle test module
    (each stage writes its own subfolder of ``runs``)."""
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}")
    tmp_path = tmp_path_factory.mktemp("brain")
    bundle_run("brain_mri_3d", ["train_teacher.yaml"], tmp_path, env)
    bundle_run("brain_mri_3d", ["train_teacher.yaml", "evaluate.yaml"], tmp_path, env)
    return tmp_path, env, f"sqlite:///{tmp_path / 'runs' / 'mlruns.db'}"


def bundle_network(bundle: str, key: str = "student_def"):
    """The network of the bundle's spec ``key`` (train_teacher.yaml), freshly built: what its checkpoints hold."""
    from monai.bundle import ConfigParser

    from monai_kdx.networks import build_network

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "configs" / "train_teacher.yaml"))
    return build_network(parser.get_parsed_content(key))
