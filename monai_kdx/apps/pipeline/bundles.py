"""Find the MONAI bundles shipped inside the package, copy one out (``export_bundle``), run them in-process
(``ConfigWorkflow``) and collect what they produced."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "BUNDLES_DIR",
    "QUICK_OVERRIDES",
    "available_bundles",
    "bundle_path",
    "bundle_parser",
    "export_bundle",
    "run_bundle",
    "StageResult",
]

# The bundles are package data (monai_kdx/bundles, in the wheel too); the repository's ``bundles`` is a symlink to it.
BUNDLES_DIR = Path(__file__).resolve().parents[2] / "bundles"

# Settings of the quick mode used by tests: a tiny dataset and one epoch.
QUICK_OVERRIDES = {"n_samples": 16, "spatial_size": 32, "max_epochs": 1, "patience": 1, "batch_size": 4}


def available_bundles() -> list[str]:
    """The names of the bundles shipped in the package (``["brain_mri_3d", "chest_xray_2d"]``)."""
    return sorted(p.name for p in BUNDLES_DIR.iterdir() if (p / "configs" / "metadata.json").is_file())


def bundle_path(name: str) -> Path:
    """The folder of a bundle shipped in the package's ``bundles/`` (e.g. ``"brain_mri_3d"``).

    Raises:
        FileNotFoundError: the bundle does not exist; the message lists the available ones.
    """
    path = BUNDLES_DIR / name
    if not name or Path(name).name != name or not (path / "configs" / "metadata.json").is_file():
        raise FileNotFoundError(f"no bundle {name!r} in {BUNDLES_DIR}; available: {available_bundles()}.")
    return path


# What a bundle folder is made of (MONAI's layout); runs/, data/ and models/ a run may have written are left behind.
BUNDLE_PARTS = ("configs", "docs")


def export_bundle(name: str, folder: str | os.PathLike) -> Path:
    """Copy the packaged bundle ``name`` out as a plain MONAI bundle folder (``configs/``, ``docs/``) to edit and run:
    ``python -m monai.bundle run --config_file FOLDER/configs/train_teacher.yaml --bundle_root FOLDER``.

    Everything is checked before anything is written; the copy is made in a hidden sibling of ``folder`` and renamed
    into place, so a failure leaves no half-written bundle. Missing parent folders are created.

    Args:
        name: a packaged bundle (:func:`available_bundles`).
        folder: the new bundle's folder; it must not exist, or be an empty folder.

    Returns:
        The bundle's folder, absolute.

    Raises:
        FileNotFoundError: no bundle ``name`` (the message lists the available ones).
        FileExistsError: ``folder`` exists and is not an empty folder.
    """
    source = bundle_path(name)
    target = Path(os.path.abspath(os.fspath(folder)))
    if target.exists() or target.is_symlink():
        if not target.is_dir() or target.is_symlink():
            raise FileExistsError(f"{target} exists and is not a folder; give a new or empty folder.")
        if any(target.iterdir()):
            raise FileExistsError(f"{target} is not empty; give a new or empty folder.")
    if target == source or source in target.parents:
        raise ValueError(f"{target} lies inside the packaged bundle {source}; give a folder outside it.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.export-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        for part in BUNDLE_PARTS:
            if (source / part).is_dir():
                shutil.copytree(source / part, staging / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        os.replace(staging, target)  # an empty target folder is replaced in one step (POSIX)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def bundle_parser(bundle: str, configs: Sequence[str], overrides: dict[str, Any] | None = None) -> Any:
    """A MONAI ``ConfigParser`` of a bundle's ``configs`` (laid on each other in order) with ``overrides``; nothing
    is instantiated until asked for (``parser.get_parsed_content(id)``)."""
    from monai.bundle import ConfigParser

    root = bundle_path(bundle)
    parser = ConfigParser()
    parser.read_config([str(root / "configs" / name) for name in configs])
    parser.update({**(overrides or {}), "bundle_root": str(root)})
    return parser


@dataclass
class StageResult:
    """What one bundle run produced: its metrics, MLflow run and timing."""

    name: str
    metrics: dict[str, float]
    tracking_uri: str
    experiment_name: str
    run_name: str
    seconds: float
    extras: dict[str, Any] = field(default_factory=dict)


def run_bundle(
    bundle: str,
    configs: list[str],
    engine_ids: Sequence[str],
    on_initialized: Callable[[Any], None] | None = None,
    **overrides: Any,
) -> StageResult:
    """Run bundle configs (later files override earlier ones) with MONAI's ``ConfigWorkflow``.

    Equivalent to ``python -m monai.bundle run --config_file "[...]" --key value ...``.

    Args:
        bundle: the name of a packaged bundle (:func:`available_bundles`).
        configs: config file names inside the bundle's ``configs/`` folder.
        engine_ids: config ids of the engines whose final ``state.metrics`` are returned (merged).
        on_initialized: called with the initialized ``ConfigWorkflow`` before it runs (e.g. to attach a
            progress bar to its trainer).
        overrides: config values to override (``bundle_root`` defaults to the bundle's folder).

    Returns:
        A :class:`StageResult` with the engine's final metrics and where MLflow recorded them.
    """
    from monai.bundle import ConfigWorkflow

    root = bundle_path(bundle)
    overrides.setdefault("bundle_root", str(root))
    workflow = ConfigWorkflow(
        config_file=[str(root / "configs" / name) for name in configs],
        meta_file=str(root / "configs" / "metadata.json"),
        logging_file=str(root / "configs" / "logging.conf"),
        workflow_type=None,
        **overrides,
    )
    start = time.perf_counter()
    workflow.initialize()
    if on_initialized is not None:
        on_initialized(workflow)
    workflow.run()
    parsed = workflow.parser.get_parsed_content
    metrics = {key: float(value) for engine in map(parsed, engine_ids) for key, value in engine.state.metrics.items()}
    workflow.finalize()
    return StageResult(
        name=Path(configs[-1]).stem,
        metrics=metrics,
        tracking_uri=parsed("tracking_uri"),
        experiment_name=parsed("experiment_name"),
        run_name=parsed("run_name"),
        seconds=time.perf_counter() - start,
        extras={"output_dir": os.path.abspath(parsed("output_dir")), "datalist": parsed("datalist")},
    )
