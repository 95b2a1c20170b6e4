"""The main job: teacher → distilled student → relevance-pruned student, a saliency-guided variant,
hierarchical explanations of all four, and a summary report, as one MLflow parent run with one
child run per stage.

Every stage is a sequence of the bundle's own configs (the same files ``python -m monai.bundle run``
takes; see the README), run in-process. The pipeline creates each stage's child run and passes its
name as ``run_name``: the bundle's ``MLFlowHandler``\\ s log into it (MONAI's handler picks the
unfinished run with that name), so params, metrics, checkpoints, NIfTI heatmaps, figures and the
registered models all land in the stage's child run.

After each stage, ``<output_dir>/pipeline.json`` records the stage's run id, metrics and outputs. An
interrupted pipeline started again with the same settings skips the completed stages (their runs
and files are kept) and resumes at the first stage not completed; the parent run is reused.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .bundles import QUICK_OVERRIDES, StageResult, bundle_path, run_bundle

__all__ = ["STAGES", "Pipeline", "PipelineResult", "check_checkpoint", "run_pipeline"]

STAGES = ("teacher", "distill", "prune", "saliency", "explain")
STATE_FILE = "pipeline.json"
STATE_VERSION = 1

# Quick mode (tests, smoke runs): QUICK_OVERRIDES for every bundle run, plus these per stage.
QUICK_STAGE_OVERRIDES: dict[str, dict[str, Any]] = {
    "prune": {"calibration_batches": 2},
    "explain": {"faithfulness_steps": 4},
}
# Full mode: what keeps the main job within 10 minutes on 2 CPU cores (the teacher keeps the bundle's
# 12 epochs; the student trains for fewer, its saliency-guided variant is fine-tuned from it; two thirds
# of the 36 test volumes are explained).
STAGE_OVERRIDES: dict[str, dict[str, Any]] = {
    "distill": {"max_epochs": 8},
    "saliency": {"max_epochs": 4, "learning_rate": 0.0005},
    "explain": {"faithfulness_steps": 8, "explain_limit": 24},
}

# What each stage reads and writes, relative to the output folder.
TEACHER_CKPT = os.path.join("models", "model.pt")
STUDENT_CKPT = os.path.join("student", "model.pt")
PRUNED_FILE = os.path.join("pruned", "model_pruned.pt")
SALIENCY_CKPT = os.path.join("saliency", "model.pt")
STAGE_INPUTS: dict[str, tuple[tuple[str, str], ...]] = {
    "teacher": (),
    "distill": ((TEACHER_CKPT, "the teacher checkpoint"),),
    "prune": ((STUDENT_CKPT, "the distilled student checkpoint"),),
    "saliency": ((STUDENT_CKPT, "the distilled student checkpoint"),),
    "explain": (
        (TEACHER_CKPT, "the teacher checkpoint"),
        (STUDENT_CKPT, "the distilled student checkpoint"),
        (PRUNED_FILE, "the pruned student"),
        (SALIENCY_CKPT, "the saliency-guided student checkpoint"),
    ),
}
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "teacher": (TEACHER_CKPT,),
    "distill": (STUDENT_CKPT,),
    "prune": (PRUNED_FILE,),
    "saliency": (SALIENCY_CKPT,),
    "explain": (os.path.join("report", "report.md"),),
}


def check_checkpoint(path: str, stage: str, description: str) -> None:
    """Fail with a message naming the file and the reason when a stage's input is missing or unreadable.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file cannot be read by ``torch.load(weights_only=True)`` (truncated, corrupt, not a
            checkpoint) or holds no weights.
    """
    import torch

    if not os.path.isfile(path):
        raise FileNotFoundError(f"stage {stage!r} needs {description} {path}: the file does not exist.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, foreign pickle, empty file, ...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"stage {stage!r} needs {description} {path}: the file is corrupt or not a PyTorch checkpoint ({reason})."
        ) from error
    if not isinstance(payload, dict) or not payload:
        raise ValueError(f"stage {stage!r} needs {description} {path}: the file holds no weights ({type(payload)}).")


@dataclass
class PipelineResult:
    """What a pipeline run produced: per-stage results (metrics, run ids, seconds), the parent run, the
    summary rows and the report's files."""

    output_dir: str
    tracking_uri: str
    experiment_name: str
    parent_run_id: str
    stages: dict[str, dict[str, Any]]
    skipped: list[str]
    summary: list[dict[str, Any]]
    report: dict[str, str]


class Pipeline:
    """The main job on one bundle, resumable stage by stage.

    Args:
        output_dir: data, checkpoints, explanations, the report, ``pipeline.json`` and (by default) the
            MLflow store go here.
        bundle: the bundle in ``bundles/`` (``"brain_mri_3d"`` or ``"chest_xray_2d"``).
        quick: tiny data and one epoch per training stage (tests, smoke runs).
        tracking_uri: MLflow tracking URI; default ``sqlite:///<output_dir>/mlruns.db``. Checked before any
            work (an unreachable server fails at once).
        experiment_name: the MLflow experiment; default the bundle's name.
        restart: ignore a previous, interrupted run in ``output_dir`` and start over.
        overrides: bundle config overrides for every stage (e.g. ``max_epochs=3``).

    Raises:
        ValueError: ``output_dir`` holds a pipeline started with other settings (and ``restart`` is false).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike = "runs/demo",
        bundle: str = "brain_mri_3d",
        quick: bool = False,
        tracking_uri: str | None = None,
        experiment_name: str | None = None,
        restart: bool = False,
        **overrides: Any,
    ) -> None:
        from monai_kdx.tracking import check_tracking_uri, default_tracking_uri

        bundle_path(bundle)  # an unknown bundle fails here
        self.output_dir = os.path.abspath(os.fspath(output_dir))
        self.bundle = bundle
        self.quick = quick
        self.tracking_uri = check_tracking_uri(tracking_uri or default_tracking_uri(self.output_dir))
        self.experiment_name = experiment_name or bundle
        self.overrides = dict(overrides)
        self.settings = {
            "bundle": bundle,
            "quick": quick,
            "tracking_uri": self.tracking_uri,
            "experiment_name": self.experiment_name,
            "overrides": {key: repr(value) for key, value in sorted(self.overrides.items())},
        }
        self.state_path = os.path.join(self.output_dir, STATE_FILE)
        self.state = self._load_state(restart)

    # --- state -----------------------------------------------------------------------------------
    def _load_state(self, restart: bool) -> dict[str, Any]:
        fresh = {"version": STATE_VERSION, "settings": self.settings, "parent_run_id": None, "stages": {}}
        if restart or not os.path.isfile(self.state_path):
            return fresh
        try:
            with open(self.state_path) as stream:
                state = json.load(stream)
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"{self.state_path} is unreadable ({error}); pass restart=True (--restart).") from error
        if state.get("version") != STATE_VERSION or state.get("settings") != self.settings:
            raise ValueError(
                f"{self.output_dir} holds a pipeline started with other settings ({state.get('settings')}); "
                f"use another output folder or restart=True (--restart) to start over."
            )
        return state

    def _save_state(self) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        temporary = self.state_path + ".tmp"
        with open(temporary, "w") as stream:
            json.dump(self.state, stream, indent=2)
        os.replace(temporary, self.state_path)

    def completed(self, stage: str) -> bool:
        """Whether ``stage`` completed and its outputs are still there."""
        record = self.state["stages"].get(stage)
        return bool(record) and all(os.path.isfile(self.path(p)) for p in STAGE_OUTPUTS[stage])

    def path(self, relative: str) -> str:
        """An output path, absolute."""
        return os.path.join(self.output_dir, relative)

    # --- settings of the bundle runs ---------------------------------------------------------------
    def bundle_settings(self, stage: str, run_name: str) -> dict[str, Any]:
        """Config overrides of one bundle run of ``stage`` logging to the run named ``run_name``."""
        return {
            "output_dir": self.output_dir,
            "dataset_dir": os.path.join(self.output_dir, "data", self.bundle),
            "tracking_uri": self.tracking_uri,
            "experiment_name": self.experiment_name,
            "run_name": run_name,
            **(QUICK_OVERRIDES if self.quick else {}),
            **(QUICK_STAGE_OVERRIDES if self.quick else STAGE_OVERRIDES).get(stage, {}),
            **self.overrides,
        }

    def run_in(self, run_id: str, stage: str, configs: Sequence[str], engines: Sequence[str], **extra: Any):
        """One bundle run logging into the existing run ``run_id`` (reopened: MONAI's handler ends it)."""
        from mlflow.tracking import MlflowClient

        from monai_kdx.tracking import reopen_run

        reopen_run(self.tracking_uri, run_id)
        name = MlflowClient(self.tracking_uri).get_run(run_id).info.run_name
        return run_bundle(self.bundle, list(configs), engines, **{**self.bundle_settings(stage, name), **extra})

    # --- the pipeline ------------------------------------------------------------------------------
    def run(self, until: str | None = None) -> PipelineResult:
        """Run (or resume) the stages in order, up to and including ``until``.

        Returns:
            A :class:`PipelineResult`.

        Raises:
            ValueError: ``until`` is not a stage; a stage input is corrupt (names the file).
            FileNotFoundError: a stage input is missing (names the file).
        """
        from monai_kdx.tracking import end_run, reopen_run, start_parent_run

        if until is not None and until not in STAGES:
            raise ValueError(f"unknown stage {until!r}; stages: {STAGES}.")
        last = STAGES.index(until) if until else len(STAGES) - 1
        first = next((i for i, stage in enumerate(STAGES) if not self.completed(stage)), len(STAGES))
        for stage in STAGES[first:]:  # a stage run again invalidates what came after it
            self.state["stages"].pop(stage, None)
        skipped = list(STAGES[: min(first, last + 1)])
        if self.state["parent_run_id"] is None:
            self.state["parent_run_id"] = start_parent_run(
                self.tracking_uri,
                self.experiment_name,
                run_name="pipeline",
                params={"bundle": self.bundle, "quick": self.quick, **self.overrides},
                tags={"monai_kdx.pipeline": self.output_dir},
            )
            self._save_state()
        else:
            reopen_run(self.tracking_uri, self.state["parent_run_id"])
        parent = self.state["parent_run_id"]
        for stage in skipped:
            print(f"[pipeline] {stage}: completed earlier (run {self.state['stages'][stage]['run_id']}), skipped")
        try:
            for stage in STAGES[first : last + 1]:
                self._run_stage(stage, parent)
        except BaseException as error:
            end_run(self.tracking_uri, parent, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
            raise
        end_run(self.tracking_uri, parent, "FINISHED")
        explain = self.state["stages"].get("explain", {})
        return PipelineResult(
            output_dir=self.output_dir,
            tracking_uri=self.tracking_uri,
            experiment_name=self.experiment_name,
            parent_run_id=parent,
            stages=self.state["stages"],
            skipped=skipped,
            summary=explain.get("summary", []),
            report=explain.get("report", {}),
        )

    def _run_stage(self, stage: str, parent: str) -> None:
        from monai_kdx.tracking import end_run, start_child_run

        for relative, description in STAGE_INPUTS[stage]:  # before any run or file is created
            check_checkpoint(self.path(relative), stage, description)
        print(f"[pipeline] {stage}: running")
        start = time.perf_counter()
        run_id = start_child_run(self.tracking_uri, parent, stage)
        try:
            record = STAGE_FUNCTIONS[stage](self, run_id)
        except BaseException as error:
            end_run(self.tracking_uri, run_id, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
            raise
        end_run(self.tracking_uri, run_id, "FINISHED")
        record.update(run_id=run_id, seconds=round(time.perf_counter() - start, 1))
        self.state["stages"][stage] = record
        self._save_state()
        self._log_to_parent(parent, stage, record)
        print(f"[pipeline] {stage}: done in {record['seconds']:.0f} s {record['metrics']}")

    def _log_to_parent(self, parent: str, stage: str, record: dict[str, Any]) -> None:
        from monai_kdx.tracking import log_metrics

        values = {f"{stage}_{key}": value for key, value in record["metrics"].items()}
        log_metrics(self.tracking_uri, parent, {**values, f"{stage}_seconds": record["seconds"]})


# --- the stages: each runs the bundle's configs into its child run and returns its record ----------


def _metrics(*results: StageResult) -> dict[str, float]:
    return {key: value for result in results for key, value in result.metrics.items()}


def _registered_models(pipeline: Pipeline, run_id: str) -> list[dict[str, str]]:
    from mlflow.tracking import MlflowClient

    versions = MlflowClient(pipeline.tracking_uri).search_model_versions(f"run_id = '{run_id}'")
    return [{"name": v.name, "version": str(v.version), "uri": f"models:/{v.name}/{v.version}"} for v in versions]


def _stage_teacher(pipeline: Pipeline, run_id: str) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    from monai_kdx.visualize import datalist_preview

    train = pipeline.run_in(run_id, "teacher", ["train_teacher.yaml"], ["train#trainer", "validate#evaluator"])
    preview = pipeline.path("dataset_preview.png")
    datalist_preview(train.extras["datalist"], preview)
    MlflowClient(pipeline.tracking_uri).log_artifact(run_id, preview)
    test = pipeline.run_in(run_id, "teacher", ["train_teacher.yaml", "evaluate.yaml"], ["evaluator"])
    return {"metrics": _metrics(train, test), "preview": preview}


def _stage_distill(pipeline: Pipeline, run_id: str) -> dict[str, Any]:
    configs = ["train_teacher.yaml", "distill.yaml"]
    train = pipeline.run_in(run_id, "distill", configs, ["train#trainer", "validate#evaluator"])
    test = pipeline.run_in(run_id, "distill", [*configs, "evaluate.yaml"], ["evaluator"])
    return {"metrics": _metrics(train, test), "models": _registered_models(pipeline, run_id)}


def _stage_prune(pipeline: Pipeline, run_id: str) -> dict[str, Any]:
    engines = ["train#trainer", "validate#evaluator", "test#evaluator"]
    result = pipeline.run_in(run_id, "prune", ["train_teacher.yaml", "prune.yaml"], engines)
    return {"metrics": result.metrics, "models": _registered_models(pipeline, run_id)}


def _stage_saliency(pipeline: Pipeline, run_id: str) -> dict[str, Any]:
    """The distilled student fine-tuned with its Grad-CAM pulled toward the gaze maps (saliency_train.yaml)."""
    configs = ["train_teacher.yaml", "saliency_train.yaml"]
    student = pipeline.path(STUDENT_CKPT)
    network = "monai_kdx.networks.build_network(@student_def).to(@device)"
    start = {"network": f"$monai_kdx.networks.load_weights({network}, {student!r})"}
    train = pipeline.run_in(run_id, "saliency", configs, ["train#trainer", "validate#evaluator"], **start)
    test = pipeline.run_in(run_id, "saliency", [*configs, "evaluate.yaml"], ["evaluator"])
    return {"metrics": _metrics(train, test)}


def explained_models(pipeline: Pipeline) -> dict[str, dict[str, Any]]:
    """The four explained models: the bundle overlays that build each and the extra overrides."""
    pruned = pipeline.path(PRUNED_FILE)
    return {
        "teacher": {"configs": ["train_teacher.yaml"], "extra": {}},
        "student": {"configs": ["train_teacher.yaml", "distill.yaml"], "extra": {}},
        "pruned": {
            "configs": ["train_teacher.yaml"],
            "extra": {
                "network": f"$monai_kdx.pruning.load_pruned({pruned!r}).to(@device)",
                "ckpt_path": pruned,
                "handlers#0#_disabled_": True,  # the CheckpointLoader: the weights are in the file
                "tracked_params#network": "pruned student",
            },
        },
        "saliency": {"configs": ["train_teacher.yaml", "saliency_train.yaml"], "extra": {}},
    }


def _stage_explain(pipeline: Pipeline, run_id: str) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    from monai_kdx.tracking import end_run, log_metrics, start_child_run

    from .summary import write_summary

    metrics, explain_runs, per_model = {}, {}, {}
    for name, spec in explained_models(pipeline).items():
        child = start_child_run(pipeline.tracking_uri, run_id, f"explain_{name}", stage="explain")
        folder = pipeline.path(os.path.join("explanations", name))
        result = pipeline.run_in(
            child, "explain", [*spec["configs"], "explain.yaml"], ["evaluator"], explanation_dir=folder, **spec["extra"]
        )
        end_run(pipeline.tracking_uri, child, "FINISHED")
        explain_runs[name] = child
        per_model[name] = result.metrics
        metrics.update({f"{name}_{key}": value for key, value in result.metrics.items()})
    summary, report = write_summary(pipeline, pipeline.path("report"), per_model)
    log_metrics(pipeline.tracking_uri, run_id, {f"{row['model']}_{k}": v for row in summary for k, v in row.items()})
    client = MlflowClient(pipeline.tracking_uri)
    client.log_artifacts(run_id, pipeline.path("report"), "report")
    client.log_artifacts(pipeline.state["parent_run_id"], pipeline.path("report"), "report")
    return {"metrics": metrics, "explain_runs": explain_runs, "summary": summary, "report": report}


STAGE_FUNCTIONS: dict[str, Callable[[Pipeline, str], dict[str, Any]]] = {
    "teacher": _stage_teacher,
    "distill": _stage_distill,
    "prune": _stage_prune,
    "saliency": _stage_saliency,
    "explain": _stage_explain,
}


def run_pipeline(
    output_dir: str | os.PathLike = "runs/demo",
    quick: bool = False,
    until: str | None = None,
    **kwargs: Any,
) -> PipelineResult:
    """Run (or resume) the main job; see :class:`Pipeline` for the arguments."""
    return Pipeline(output_dir, quick=quick, **kwargs).run(until=until)
