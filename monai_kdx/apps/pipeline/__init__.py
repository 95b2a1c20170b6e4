"""The main job and the bundle runner it is built on.

- :mod:`.stages`: the stages and their models, in one table;
- :mod:`.bundles`: the MONAI bundles shipped in the package: find them, copy one out (``export_bundle``), run their
  configs in-process (``run_bundle``);
- :mod:`.runner`: the resumable pipeline teacher → distill → prune → saliency → explain, one MLflow parent run with
  a child run per stage, one job at a time per output folder (``Pipeline``, ``run_pipeline``);
- :mod:`.summary`: the summary table and report of trained, explained models;
- :mod:`.state`: the output folder's lock and the checksums of the stages' outputs.
"""

from __future__ import annotations

from .bundles import (
    BUNDLES_DIR,
    QUICK_OVERRIDES,
    StageResult,
    available_bundles,
    bundle_parser,
    bundle_path,
    export_bundle,
    run_bundle,
)
from .runner import STAGE_FUNCTIONS, Pipeline, PipelineResult, check_checkpoint, run_pipeline
from .stages import MODELS, STAGES, ModelEntry
from .state import FolderInUseError, OutputLock
from .summary import data_notes, summary_markdown, write_summary

__all__ = [
    "BUNDLES_DIR",
    "QUICK_OVERRIDES",
    "MODELS",
    "STAGES",
    "STAGE_FUNCTIONS",
    "FolderInUseError",
    "ModelEntry",
    "OutputLock",
    "Pipeline",
    "PipelineResult",
    "StageResult",
    "available_bundles",
    "bundle_parser",
    "bundle_path",
    "check_checkpoint",
    "export_bundle",
    "run_bundle",
    "run_pipeline",
    "data_notes",
    "summary_markdown",
    "write_summary",
]
