"""Run the project's MONAI bundles in-process (``ConfigWorkflow``) and collect what they produced."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["BUNDLES_DIR", "QUICK_OVERRIDES", "bundle_path", "bundle_parser", "run_bundle", "StageResult"]

BUNDLES_DIR = Path(__file__).resolve().parents[3] / "bundles"

# Settings of the quick mode used by tests: a tiny dataset and one epoch.
QUICK_OVERRIDES = {"n_samples": 16, "spatial_size": 32, "max_epochs": 1, "batch_size": 4}


def bundle_path(name: str) -> Path:
    """The folder of a bundle shipped in ``bundles/`` (e.g. ``"brain_mri_3d"``).

    Raises:
        FileNotFoundError: the bundle does not exist; the message lists the available ones.
    """
    path = BUNDLES_DIR / name
    if not (path / "configs" / "metadata.json").is_file():
        available = sorted(p.name for p in BUNDLES_DIR.glob("*") if (p / "configs" / "metadata.json").is_file())
        raise FileNotFoundError(f"no bundle {name!r} in {BUNDLES_DIR}; available: {available}.")
    return path


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
    **overrides: Any,
) -> StageResult:
    """Run bundle configs (later files override earlier ones) with MONAI's ``ConfigWorkflow``.

    Equivalent to ``python -m monai.bundle run --config_file "[...]" --key value ...``.

    Args:
        bundle: the bundle's name in ``bundles/``.
        configs: config file names inside the bundle's ``configs/`` folder.
        engine_ids: config ids of the engines whose final ``state.metrics`` are returned (merged).
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
