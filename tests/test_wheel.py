"""The wheel carries its bundles: ``monai-kdx bundle export`` copies a packaged bundle out as a plain MONAI bundle
folder that verifies and runs anywhere; a wheel built from the checkout and installed into a fresh virtual environment
runs ``monai-kdx demo`` from an unrelated folder, reading the bundle configs from the installed package and writing
only under ``--out``."""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import REPO, VENV_BIN

from monai_kdx.apps.pipeline import BUNDLES_DIR, available_bundles, export_bundle
from monai_kdx.cli import main

BUNDLES = ["brain_mri_3d", "chest_xray_2d"]
RUN_OUTPUTS = {"runs", "data", "models"}  # what a bundle run in place writes next to its configs: never packaged


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _entries(folder: Path) -> list[str]:
    """Every file and folder under ``folder``, hidden ones included."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _packaged_files(bundle: str) -> list[str]:
    """A packaged bundle's files (configs/, docs/), without what a run in place may have written."""
    root = BUNDLES_DIR / bundle
    return [name for name in _files(root) if name.split(os.sep)[0] in ("configs", "docs") and "__pycache__" not in name]


# --- export: refusals, atomicity ----------------------------------------------------------------------------------


def test_the_bundles_live_in_the_package_and_the_repository_links_to_them():
    import monai_kdx

    assert Path(monai_kdx.__file__).resolve().parent / "bundles" == BUNDLES_DIR
    assert available_bundles() == BUNDLES
    assert (REPO / "bundles").is_symlink() and os.readlink(REPO / "bundles") == "monai_kdx/bundles"
    assert (REPO / "bundles").resolve() == BUNDLES_DIR


def test_bundle_list_names_the_packaged_bundles(capsys):
    assert main(["bundle", "list"]) == 0
    assert [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()] == BUNDLES


@pytest.mark.parametrize(
    "case, message",
    [
        ("unknown", "no bundle 'nope'"),
        ("not_empty", "is not empty"),
        ("a_file", "is not a folder"),
        ("path_name", "no bundle 'brain_mri_3d/configs'"),
    ],
)
def test_bad_export_is_one_line_exit_2_and_writes_nothing(case, message, tmp_path, capsys):
    target = tmp_path / "out"
    name = {"unknown": "nope", "path_name": "brain_mri_3d/configs"}.get(case, "brain_mri_3d")
    if case == "not_empty":
        target.mkdir()
        (target / "keep.txt").write_text("mine")
    elif case == "a_file":
        target.write_text("mine")
    before = _entries(tmp_path)
    assert main(["bundle", "export", name, str(target)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("monai-kdx bundle: error: ")
    assert message in captured.err
    if case in ("unknown", "path_name"):
        assert "available: ['brain_mri_3d', 'chest_xray_2d']" in captured.err
    assert _entries(tmp_path) == before  # nothing written, no hidden staging folder left


def test_export_into_an_empty_folder_and_a_failure_leaves_nothing(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export_bundle("chest_xray_2d", empty) == empty
    assert _files(empty) == _packaged_files("chest_xray_2d")
    assert os.listdir(tmp_path) == ["empty"]  # the staging folder was renamed into place

    import monai_kdx.apps.pipeline.bundles as bundles

    copytree, calls = shutil.copytree, []

    def failing_copytree(src, dst, **kwargs):  # configs/ copied, then the disk fills up
        calls.append(src)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return copytree(src, dst, **kwargs)

    monkeypatch.setattr(bundles.shutil, "copytree", failing_copytree)
    with pytest.raises(OSError, match="No space left"):
        export_bundle("brain_mri_3d", tmp_path / "nested" / "half")
    assert len(calls) == 2
    assert not (tmp_path / "nested" / "half").exists()
    assert os.listdir(tmp_path / "nested") == []  # no staging folder left


# --- export end to end: verify_metadata, monai.bundle run from another folder ------------------------------------


@pytest.mark.slow
def test_exported_bundle_verifies_and_runs_from_an_unrelated_folder(tmp_path, subprocess_env):
    from monai.bundle import verify_metadata

    elsewhere, workdir = tmp_path / "elsewhere", tmp_path / "workdir"
    elsewhere.mkdir()
    workdir.mkdir()
    exported = subprocess.run(
        [str(VENV_BIN / "monai-kdx"), "bundle", "export", "brain_mri_3d", "my_bundle"],
        cwd=elsewhere,
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    folder = elsewhere / "my_bundle"
    assert f"--bundle_root {folder}" in exported.stdout
    assert _files(folder) == _packaged_files("brain_mri_3d")
    for name in _files(folder):  # byte for byte
        assert filecmp.cmp(folder / name, BUNDLES_DIR / "brain_mri_3d" / name, shallow=False), name
    verify_metadata(meta_file=str(folder / "configs" / "metadata.json"), filepath=str(BUNDLES_DIR / "meta_schema.json"))

    # the README's command on the exported folder (meta_file and logging_file default to its configs/); a patience
    # within the one-epoch cap (the bundles refuse a plateau stop that could never happen)
    command = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", str(folder / "configs" / "train_teacher.yaml"),
        "--bundle_root", str(folder),
        "--n_samples", "12", "--spatial_size", "32", "--max_epochs", "1", "--patience", "1", "--batch_size", "4",
        "--output_dir", str(tmp_path / "runs"), "--dataset_dir", str(tmp_path / "data"),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=workdir, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "runs" / "models" / "model_final.pt").is_file()
    assert (tmp_path / "runs" / "mlruns.db").is_file()
    assert list(workdir.iterdir()) == []  # no ./mlruns in the working directory
    assert _files(folder) == _packaged_files("brain_mri_3d")  # the bundle folder holds only its configs and docs


# --- the wheel ---------------------------------------------------------------------------------------------------

# Logs every file the venv's Python processes open (and every SQLite database they connect to), to check where the
# demo read its bundle configs and where it wrote. Loaded by a .pth file of the test venv only.
AUDIT_MODULE = """
import os, sys

_LOG = os.environ.get("KDX_TEST_OPEN_LOG")
if _LOG:
    _out = open(_LOG, "a", buffering=1)
    _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND

    def _hook(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if mode else bool((flags or 0) & _WRITE)
        elif event == "sqlite3.connect" and isinstance(args[0], (str, bytes, os.PathLike)):
            path, writing = args[0], True
        else:
            return
        if os.fsdecode(path) in ("", ":memory:"):
            return
        _out.write(("w" if writing else "r") + "\\t" + os.path.abspath(os.fsdecode(path)) + "\\n")

    sys.addaudithook(_hook)
"""


def _copy_sources(target: Path) -> None:
    """The files ``pip wheel`` builds from (setup.cfg, pyproject.toml, MANIFEST.in, the README, the package)."""
    target.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "MANIFEST.in", "README.md"):
        shutil.copy2(REPO / name, target / name)

    def ignore(folder: str, names: list[str]) -> set[str]:
        skipped = {name for name in names if name == "__pycache__" or name.endswith(".pyc")}
        if Path(folder).parent == REPO / "monai_kdx" / "bundles":  # a bundle's own runs/data/models, if any
            skipped |= RUN_OUTPUTS & set(names)
        return skipped

    shutil.copytree(REPO / "monai_kdx", target / "monai_kdx", ignore=ignore)


def _under(path: str, folder: Path) -> bool:
    return path == str(folder) or path.startswith(str(folder) + os.sep)


@pytest.mark.slow
def test_wheel_installed_in_a_fresh_venv_runs_the_demo_from_its_packaged_bundles(tmp_path, subprocess_env):
    # 1. The wheel. Built from a copy of the checkout's sources: `pip wheel .` in the checkout writes build/ and
    # monai_kdx.egg-info into it, which the editable install and other users of the checkout see. No build
    # isolation: the venv's setuptools builds it offline, in about a second.
    source = tmp_path / "src"
    _copy_sources(source)
    for junk in ("runs/mlruns.db", "data/datalist.json", "models/model.pt"):  # a bundle run in place wrote these
        (source / "monai_kdx" / "bundles" / "brain_mri_3d" / junk).parent.mkdir(parents=True, exist_ok=True)
        (source / "monai_kdx" / "bundles" / "brain_mri_3d" / junk).write_text("not package data")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(tmp_path / "dist")],
        cwd=tmp_path,
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    assert "would be ignored" not in build.stdout + build.stderr  # no setuptools warning about the data folders
    (wheel,) = (tmp_path / "dist").glob("monai_kdx-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    packaged = sorted(n for n in names if n.startswith("monai_kdx/bundles/"))
    expected = ["monai_kdx/bundles/meta_schema.json"] + [
        f"monai_kdx/bundles/{bundle}/{name}" for bundle in BUNDLES for name in _packaged_files(bundle)
    ]
    assert packaged == sorted(expected)
    assert {"configs/logging.conf", "configs/metadata.json", "docs/README.md"} <= set(_packaged_files("brain_mri_3d"))

    # 2. A fresh venv outside the checkout. It reuses the installed dependencies (torch, monai, mlflow, ...) of the
    # test's environment through a .pth line naming that environment's site-packages. Not --system-site-packages:
    # a venv made from a venv gets the BASE interpreter's site-packages, where none of them are. And not a path that
    # Python scans as a site directory: a plain path line in a .pth is only appended to sys.path, so the .pth files
    # in that folder, the editable install's finder (__editable__.monai_kdx-*.pth, which maps monai_kdx to the
    # checkout) among them, are never executed, and the venv's own site-packages comes first on sys.path: its
    # monai_kdx wins. The wheel is installed BEFORE the .pth is written, so that pip sees no other monai_kdx.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300, cwd=tmp_path)
    install = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--no-deps", str(wheel)],
        cwd=tmp_path,
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    site = Path(
        subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    reused = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (site / "kdx_test_reuse.pth").write_text("".join(f"{path}\n" for path in reused))
    (site / "kdx_test_audit.py").write_text(AUDIT_MODULE)
    (site / "kdx_test_audit.pth").write_text("import kdx_test_audit\n")

    # the venv's processes: its bin first, no PYTHONPATH, no user site, the checkout's venv not on the PATH
    path = [p for p in os.environ["PATH"].split(os.pathsep) if Path(p).resolve() != VENV_BIN.resolve()]
    env = {k: v for k, v in subprocess_env.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PATH=os.pathsep.join([str(venv / "bin"), *path]), PYTHONNOUSERSITE="1", VIRTUAL_ENV=str(venv))
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import monai_kdx, torch; print(monai_kdx.__file__)"],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert Path(where) == site / "monai_kdx" / "__init__.py"  # not /work/main/monai_kdx

    # 3. The demo, from an unrelated working directory, every file opened logged.
    elsewhere, out, log = tmp_path / "elsewhere", tmp_path / "demo", tmp_path / "opened.log"
    elsewhere.mkdir()
    demo = subprocess.run(
        [str(venv / "bin" / "monai-kdx"), "demo", "--quick", "--out", str(out), "--until", "teacher"],
        cwd=elsewhere,
        env={**env, "KDX_TEST_OPEN_LOG": str(log)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "teacher test accuracy" in demo.stdout

    opened = [line.split("\t", 1) for line in log.read_text().splitlines()]
    configs = {path for _, path in opened if path.endswith((".yaml", "metadata.json", "logging.conf"))}
    installed = site / "monai_kdx" / "bundles" / "brain_mri_3d" / "configs"
    assert str(installed / "train_teacher.yaml") in configs
    assert {str(installed / name) for name in ("metadata.json", "logging.conf")} <= configs
    assert not [path for path in configs if "bundles" in path and not _under(path, installed)]
    checkout = [p for _, p in opened if _under(p, REPO) and not any(_under(p, Path(r)) for r in reused)]
    assert not checkout, checkout[:10]  # nothing of the checkout read or written but the reused dependencies

    written = sorted({path for mode, path in opened if mode == "w"})
    assert any(_under(path, out) for path in written) and (out / "mlruns.db").is_file()
    assert not [path for path in written if _under(path, tmp_path) and not _under(path, out) and path != str(log)]
    assert list(elsewhere.iterdir()) == []  # nothing in the working directory: no ./mlruns

    # 4. The installed package exports its bundles too.
    exported = subprocess.run(
        [str(venv / "bin" / "monai-kdx"), "bundle", "export", "chest_xray_2d", str(tmp_path / "exported")],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert _files(tmp_path / "exported") == _packaged_files("chest_xray_2d")
    assert str(site / "monai_kdx" / "bundles" / "meta_schema.json") in exported.stdout
