"""The main job and the bundle runner it is built on.

- :mod:`.bundles`: run the project's MONAI bundle configs in-process (``run_bundle``).
- :mod:`.runner`: the resumable pipeline teacher → distill → prune → saliency → explain, one MLflow
  parent run with a child run per stage (``Pipeline``, ``run_pipeline``).
- :mod:`.summary`: the summary table and report of a finished pipeline.
"""

from __future__ import annotations

from .bundles import BUNDLES_DIR, QUICK_OVERRIDES, StageResult, bundle_path, run_bundle
from .runner import STAGES, Pipeline, PipelineResult, check_checkpoint, run_pipeline
from .summary import summary_markdown

__all__ = [
    "BUNDLES_DIR",
    "QUICK_OVERRIDES",
    "STAGES",
    "Pipeline",
    "PipelineResult",
    "StageResult",
    "bundle_path",
    "check_checkpoint",
    "run_bundle",
    "run_pipeline",
    "summary_markdown",
]
