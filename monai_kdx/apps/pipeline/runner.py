"""The main job: teacher → distilled student → relevance-pruned student, a saliency-guided variant,
hierarchical explanations of all four, and a summary report, as one MLflow parent run with one
child run per stage.

Every stage is a sequence of the bundle's own configs (the same files ``python -m monai.bundle run``
takes; see the README), run in-process; the stages and their models are listed once, in
:mod:`.stages`. The pipeline creates each stage's child run and passes its name as ``run_name``: the
bundle's MLflow handlers log into it (they adopt the running run with that name), so params, metrics,
checkpoints, NIfTI heatmaps, figures and the registered models all land in the stage's child run.

After each stage, ``<output_dir>/pipeline.json`` records the stage's run id, metrics, outputs and the SHA-256 of
every output file. An interrupted pipeline started again with the same settings skips the completed stages whose
files are unchanged (their runs and files are kept) and resumes at the first stage not completed, or whose files
changed since; the parent run is reused. One pipeline at a time holds the output folder (a lock names the holder).
Paths travel as plain config values, never pasted into config expressions.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from monai_kdx.handlers import read_case_table
from monai_kdx.networks import build_network, load_weights
from monai_kdx.pruning import load_pruned
from monai_kdx.tracking import Tracker, check_tracking_uri, default_tracking_uri

from .bundles import QUICK_OVERRIDES, StageResult, bundle_parser, bundle_path, run_bundle
from .stages import MODELS, STAGES, ModelEntry, model, stage_inputs, stage_outputs
from .state import OutputLock, changed_files, digests, dump_json
from .summary import write_summary

__all__ = ["Pipeline", "PipelineResult", "check_checkpoint", "run_pipeline", "STAGE_FUNCTIONS"]

STATE_FILE = "pipeline.json"
STATE_VERSION = 2

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


def check_checkpoint(path: str, stage: str, description: str) -> None:
    """Fail with a message naming the file and the reason when a stage's input is missing or unreadable.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file cannot be read by ``torch.load(weights_only=True)`` (truncated, corrupt, not a
            checkpoint) or holds no weights.
    """
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
            MLflow store and its artifacts go here.
        bundle: the bundle shipped with the package (``"brain_mri_3d"`` or ``"chest_xray_2d"``).
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
        bundle_path(bundle)  # an unknown bundle fails here
        self.output_dir = os.path.abspath(os.fspath(output_dir))
        self.bundle = bundle
        self.quick = quick
        self.tracking_uri = check_tracking_uri(tracking_uri or default_tracking_uri(self.output_dir))
        self.tracker = Tracker(self.tracking_uri)
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
        dump_json(self.state_path, self.state)

    def changed(self, stage: str) -> list[str]:
        """The outputs of a completed ``stage`` that are missing or changed since it completed (checksums)."""
        record = self.state["stages"].get(stage)
        if not record:
            return list(stage_outputs(stage))
        return changed_files(self.output_dir, record.get("outputs", {}))

    def completed(self, stage: str) -> bool:
        """Whether ``stage`` completed and its outputs are unchanged since."""
        return stage in self.state["stages"] and not self.changed(stage)

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
        """One bundle run logging into the existing run ``run_id`` (reopened: the bundle's handler ends it)."""
        self.tracker.reopen(run_id)
        name = self.tracker.client.get_run(run_id).info.run_name
        return run_bundle(self.bundle, list(configs), engines, **{**self.bundle_settings(stage, name), **extra})

    def parser(self, configs: Sequence[str], stage: str = "explain") -> Any:
        """A ``ConfigParser`` of the bundle's ``configs`` with this pipeline's settings (nothing is run)."""
        return bundle_parser(self.bundle, configs, self.bundle_settings(stage, "summary"))

    def load_model(self, entry: ModelEntry) -> torch.nn.Module:
        """A trained model of the table, on the CPU in eval mode, from its file."""
        if entry.pruned:
            return load_pruned(self.path(entry.checkpoint)).cpu().eval()
        spec = self.parser(entry.configs).get_parsed_content("network_spec")
        return load_weights(build_network(spec), self.path(entry.checkpoint)).eval()

    # --- the pipeline ------------------------------------------------------------------------------
    def run(self, until: str | None = None) -> PipelineResult:
        """Run (or resume) the stages in order, up to and including ``until``, holding the output folder.

        Returns:
            A :class:`PipelineResult`.

        Raises:
            ValueError: ``until`` is not a stage; a stage input is corrupt (names the file).
            FileNotFoundError: a stage input is missing (names the file).
            FolderInUseError: another pipeline holds the output folder.
        """
        if until is not None and until not in STAGES:
            raise ValueError(f"unknown stage {until!r}; stages: {STAGES}.")
        with OutputLock(self.output_dir):
            return self._run(STAGES.index(until) if until else len(STAGES) - 1)

    def _run(self, last: int) -> PipelineResult:
        first = next((i for i, stage in enumerate(STAGES) if not self.completed(stage)), len(STAGES))
        if first < len(STAGES) and STAGES[first] in self.state["stages"]:
            print(f"[pipeline] {STAGES[first]}: outputs changed since it completed {self.changed(STAGES[first])}, "
                  "running it again")  # fmt: skip
        for stage in STAGES[first:]:  # a stage run again invalidates what came after it
            self.state["stages"].pop(stage, None)
        skipped = list(STAGES[: min(first, last + 1)])
        if self.state["parent_run_id"] is None:
            self.state["parent_run_id"] = self.tracker.start_parent(
                self.experiment_name,
                run_name="pipeline",
                params={"bundle": self.bundle, "quick": self.quick, **self.overrides},
                tags={"monai_kdx.pipeline": self.output_dir},
            )
            self._save_state()
        else:
            self.tracker.reopen(self.state["parent_run_id"])
        parent = self.state["parent_run_id"]
        for stage in skipped:
            print(f"[pipeline] {stage}: completed earlier (run {self.state['stages'][stage]['run_id']}), skipped")
        try:
            for stage in STAGES[first : last + 1]:
                self._run_stage(stage, parent)
        except BaseException as error:
            self.tracker.end(parent, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
            raise
        self.tracker.end(parent, "FINISHED")
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
        for entry in stage_inputs(stage):  # before any run or file is created
            check_checkpoint(self.path(entry.checkpoint), stage, f"{entry.description} checkpoint")
        for relative in stage_outputs(stage):  # never pick up a file this run did not write
            if os.path.isfile(self.path(relative)):
                os.remove(self.path(relative))
        print(f"[pipeline] {stage}: running")
        start = time.perf_counter()
        run_id = self.tracker.start_child(parent, stage)
        try:
            record = STAGE_FUNCTIONS[stage](self, run_id)
        except BaseException as error:
            self.tracker.end(run_id, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
            raise
        self.tracker.end(run_id, "FINISHED")
        missing = [relative for relative in stage_outputs(stage) if not os.path.isfile(self.path(relative))]
        if missing:
            raise RuntimeError(f"stage {stage!r} finished without writing {missing}.")
        record.update(
            run_id=run_id,
            seconds=round(time.perf_counter() - start, 1),
            outputs=digests(self.output_dir, stage_outputs(stage)),
        )
        self.state["stages"][stage] = record
        self._save_state()
        values = {f"{stage}_{key}": value for key, value in record["metrics"].items()}
        self.tracker.log_metrics(parent, {**values, f"{stage}_seconds": record["seconds"]})
        print(f"[pipeline] {stage}: done in {record['seconds']:.0f} s {record['metrics']}")


# --- the stages: each runs the bundle's configs into its child run and returns its record ----------


def _metrics(*results: StageResult) -> dict[str, float]:
    return {key: value for result in results for key, value in result.metrics.items()}


def _training_record(pipeline: Pipeline, stage: str) -> dict[str, Any]:
    """How a stage's training ended (``training/<stage>.json``, written by the bundles' ``TrainingStop``)."""
    path = pipeline.path(os.path.join("training", f"{stage}.json"))
    if not os.path.isfile(path):
        return {}
    with open(path) as stream:
        return json.load(stream)


def _train_and_test(pipeline: Pipeline, run_id: str, entry: ModelEntry, **extra: Any) -> dict[str, Any]:
    """A model's training stage: its configs, then the same with ``evaluate.yaml`` on the test split."""
    train = pipeline.run_in(run_id, entry.stage, entry.configs, ["train#trainer", "validate#evaluator"], **extra)
    test = pipeline.run_in(run_id, entry.stage, [*entry.configs, "evaluate.yaml"], ["evaluator"], **extra)
    return {
        "metrics": _metrics(train, test),
        "models": pipeline.tracker.registered_models(run_id),
        "training": _training_record(pipeline, entry.stage),
    }


def _stage_teacher(pipeline: Pipeline, run_id: str) -> dict[str, Any]:
    from monai_kdx.visualize import datalist_preview

    record = _train_and_test(pipeline, run_id, model("teacher"))
    preview = pipeline.path("dataset_preview.png")
    datalist_preview(pipeline.parser(model("teacher").configs).get_parsed_content("datalist"), preview)
    pipeline.tracker.client.log_artifact(run_id, preview)
    return {**record, "preview": preview}


def _stage_distill(pipeline: Pipeline, run_id: str) -> dict[str, Any]:
    return _train_and_test(pipeline, run_id, model("student"))


def _stage_prune(pipeline: Pipeline, run_id: str) -> dict[str, Any]:
    entry = model("pruned")
    engines = ["train#trainer", "validate#evaluator", "test#evaluator"]
    result = pipeline.run_in(run_id, entry.stage, entry.configs, engines)
    return {
        "metrics": result.metrics,
        "models": pipeline.tracker.registered_models(run_id),
        "training": _training_record(pipeline, entry.stage),
    }


def _stage_saliency(pipeline: Pipeline, run_id: str) -> dict[str, Any]:
    """The distilled student fine-tuned with its saliency pulled toward the gaze maps (saliency_train.yaml)."""
    student = pipeline.path(model("student").checkpoint)  # a plain value: paths are never pasted into expressions
    return _train_and_test(pipeline, run_id, model("saliency"), start_checkpoint=student)


def _explain_settings(pipeline: Pipeline, entry: ModelEntry) -> dict[str, Any]:
    """The overrides that make explain.yaml explain ``entry`` from its file."""
    if entry.pruned:  # the weights are in the file: no CheckpointLoader (the test handlers' first)
        network = "$monai_kdx.pruning.load_pruned(@pruned_path).to(@device)"
        return {"pruned_path": pipeline.path(entry.checkpoint), "network": network, "handlers#0#_disabled_": True}
    return {"ckpt_path": pipeline.path(entry.checkpoint)}


def _stage_explain(pipeline: Pipeline, run_id: str) -> dict[str, Any]:
    metrics, explain_runs, per_model = {}, {}, {}
    folders = {}
    for entry in MODELS:
        child = pipeline.tracker.start_child(run_id, f"explain_{entry.name}", stage="explain")
        folders[entry.name] = pipeline.path(os.path.join("explanations", entry.name))
        # a pruned model comes with its architecture in its file: the base config and the file suffice
        configs = entry.configs[:1] if entry.pruned else entry.configs
        result = pipeline.run_in(
            child,
            "explain",
            [*configs, "explain.yaml"],
            ["evaluator"],
            explanation_dir=folders[entry.name],
            **_explain_settings(pipeline, entry),
        )
        pipeline.tracker.end(child, "FINISHED")
        explain_runs[entry.name] = child
        per_model[entry.name] = result.metrics
        metrics.update({f"{entry.name}_{key}": value for key, value in result.metrics.items()})
    models = {entry.name: pipeline.load_model(entry) for entry in MODELS}
    training = {entry.name: pipeline.state["stages"].get(entry.stage, {}).get("training", {}) for entry in MODELS}
    summary, report = write_summary(
        models,
        _test_samples(pipeline, 3),
        pipeline.path("report"),
        case_tables={name: read_case_table(os.path.join(folder, "cases.csv")) for name, folder in folders.items()},
        explain_metrics=per_model,
        explanation_folders=folders,
        training=training,
        title=f"monai_kdx pipeline report: {pipeline.bundle}",
        notes=f"MLflow: `{pipeline.tracking_uri}`, experiment `{pipeline.experiment_name}`, parent run "
        f"`{pipeline.state['parent_run_id']}`.",
    )
    pipeline.tracker.log_metrics(run_id, {f"{row['model']}_{k}": v for row in summary for k, v in row.items()})
    pipeline.tracker.client.log_artifacts(run_id, pipeline.path("report"), "report")
    pipeline.tracker.client.log_artifacts(pipeline.state["parent_run_id"], pipeline.path("report"), "report")
    return {"metrics": metrics, "explain_runs": explain_runs, "summary": summary, "report": report}


def _test_samples(pipeline: Pipeline, limit: int) -> list[Mapping[str, Any]]:
    """Up to ``limit`` test samples with a lesion (image, label, mask), preprocessed as in explain.yaml."""
    parser = pipeline.parser(["train_teacher.yaml", "explain.yaml"])
    transform = parser.get_parsed_content("validate#preprocessing")
    samples = []
    for item in parser.get_parsed_content("test#dataset").data:
        sample = transform(item)
        if float(sample["mask"].sum()) > 0:
            samples.append(sample)
        if len(samples) == limit:
            break
    return samples


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
