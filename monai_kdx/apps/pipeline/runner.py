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
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from monai_kdx.apps.console import Console, key_metrics
from monai_kdx.handlers import check_stopping, read_case_table
from monai_kdx.losses import SALIENCY_METHODS
from monai_kdx.networks import build_network, load_weights, read_state_dict
from monai_kdx.pruning import load_pruned
from monai_kdx.tracking import Tracker, check_tracking_uri, default_tracking_uri

from .budget import Workload, estimate_epoch_seconds, explanation_seconds, step_seconds
from .bundles import QUICK_OVERRIDES, StageResult, bundle_parser, bundle_path, run_bundle
from .stages import MODELS, STAGES, ModelEntry, model, stage_inputs, stage_outputs
from .state import OutputLock, changed_files, digests, dump_json
from .summary import data_notes, write_summary

__all__ = [
    "Pipeline",
    "PipelineResult",
    "BUNDLE_FOR_DIMS",
    "check_checkpoint",
    "check_main_job_datalist",
    "datalist_overrides",
    "run_pipeline",
    "STAGE_FUNCTIONS",
]

STATE_FILE = "pipeline.json"
STATE_VERSION = 4  # 4: the explanation chosen by the distillation stage

# Quick mode (tests, smoke runs): QUICK_OVERRIDES for every bundle run, plus these per stage.
QUICK_STAGE_OVERRIDES: dict[str, dict[str, Any]] = {
    "prune": {"calibration_batches": 2},
    "explain": {"faithfulness_steps": 4},
}
# Full mode: the saliency-guided variant is the distilled student fine-tuned (a lower learning rate); the
# explanations' faithfulness is scored, and figures drawn, on the first cases (localization, accuracy and the NIfTI
# maps on every test case; drawing all 160 figures of a model took 45 s, more than explaining them).
STAGE_OVERRIDES: dict[str, dict[str, Any]] = {
    "saliency": {"learning_rate": 0.0005},
    "explain": {"faithfulness_steps": 8, "faithfulness_cases": 12, "figure_cases": 16},
}
EXPLANATION_CANDIDATES = ("layercam", "gradcam", "gradcam++", "activation", "integrated_gradients")
"""The explanation methods the main job chooses among, on the validation split (the teacher's pointing game), at the
start of the distillation stage (the saliency stage guides the chosen one): no single method localizes best on every
dataset and network (README, "Which method to trust?")."""
DEFAULT_TIME_BUDGET = 540.0
"""Seconds of the main job's stages by default: ``make demo`` within 10 minutes on 2 CPU cores. Besides the budget,
the job starts (imports, estimating the epochs and the explain stage, about 30 s), and the last training stage's
test evaluation and the explain stage's error come after the last budget is set (about 15 s): with 560 s, ``make
demo`` took 10 min 11 s on a machine 1.7x slower than usual (its stages 577 s)."""
BUDGET_SHARES = {"teacher": 0.36, "distill": 0.22, "prune": 0.08, "saliency": 0.09}
"""How the training stages share the time left once the explain stage's time is kept aside
(:meth:`Pipeline.explain_reserve`); a stage that stops early on a plateau leaves its time to the next ones."""
EXPLAIN_OVERHEAD = (0.04, 45.0)
"""The explain stage's seconds besides its explanations and faithfulness curves (:meth:`Pipeline.estimate_explain`),
as (seconds per case and model, seconds): reading a case, saving its maps, scoring them; starting the four bundle
runs, drawing figures, writing the report. Fitted on the brain and chest main jobs on 2 CPU cores (explain stage
174 s and 96 s, of which the timed explanations and curves 119 s and 19 s): the estimate is 15 s over and 11 s
under."""


BUNDLE_FOR_DIMS = {3: "brain_mri_3d", 2: "chest_xray_2d"}
"""The bundle whose configs run a user's datalist, by the images' spatial dimensions."""


def check_main_job_datalist(datalist: str | os.PathLike, bundle: str | None = None, resized: bool = False) -> Any:
    """Check a user's datalist for the main job before any work, beyond :func:`monai_kdx.data.check_datalist`:
    one image shape unless the images are ``resized`` (the bundles' ``resize_to``; otherwise they are batched as
    they are), lesion masks in every entry or in none (with masks, the explanations are chosen and scored against
    them) and a bundle of the data's dimensionality.

    Returns:
        The :class:`monai_kdx.data.DatalistSummary`.

    Raises:
        monai_kdx.data.DatalistError: one line naming the datalist and the problem (the entry, where there is one).
    """
    from monai_kdx.data import DatalistError, check_datalist, load_datalist

    sections = ("training", "validation", "test")
    try:  # masks in every entry or in none: with one, every entry needs one (a malformed file fails just below)
        masked = any("mask" in entry for section in sections for entry in load_datalist(datalist, section))
    except (OSError, ValueError, TypeError):  # load_datalist's errors; check_datalist names them in one line
        masked = False
    needed = {"mask": "a lesion mask, as other entries have: the explanations are scored against the masks"}
    summary = check_datalist(datalist, sections=sections, required=sections, required_keys=needed if masked else None)
    where = f"datalist {summary.path!r}"
    if len(summary.spatial_shapes) > 1 and not resized:
        raise DatalistError(
            f"{where}: images of {len(summary.spatial_shapes)} spatial shapes {summary.spatial_shapes[:3]}: resample "
            "them to one side length with --spatial-size N (resize_to=N), or beforehand."
        )
    if bundle is not None and bundle in BUNDLE_FOR_DIMS.values() and BUNDLE_FOR_DIMS[summary.spatial_dims] != bundle:
        raise DatalistError(
            f"{where}: its images are {summary.spatial_dims}D, the bundle {bundle!r} is for "
            f"{5 - summary.spatial_dims}D data; use --bundle {BUNDLE_FOR_DIMS[summary.spatial_dims]} (or leave it out)."
        )
    return summary


def datalist_overrides(summary: Any) -> dict[str, Any]:
    """The bundle overrides that run a checked datalist (:class:`monai_kdx.data.DatalistSummary`): the file, the
    number of classes and, for images of several channels, the networks' input channels."""
    overrides: dict[str, Any] = {"datalist": summary.path, "num_classes": summary.num_classes}
    if summary.in_channels != 1:
        overrides.update(
            {"teacher_def#in_channels": summary.in_channels, "student_def#in_channels": summary.in_channels}
        )
    return overrides


def check_checkpoint(path: str, stage: str, description: str) -> None:
    """Fail with a message naming the file and the reason when a stage's input is missing or unreadable.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file cannot be read by ``torch.load(weights_only=True)`` (truncated, corrupt, not a
            checkpoint) or holds no state dict (:func:`monai_kdx.networks.read_state_dict`).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"stage {stage!r} needs {description} {path}: the file does not exist.")
    try:
        read_state_dict(path)
    except ValueError as error:  # one line naming the file and the reason
        raise ValueError(f"stage {stage!r} needs {description}: {error}") from error


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
        bundle: the bundle shipped with the package (``"brain_mri_3d"`` or ``"chest_xray_2d"``); default the
            3D one, or with ``datalist`` the one of the data's dimensionality (:data:`BUNDLE_FOR_DIMS`).
        quick: tiny data and one epoch per training stage (tests, smoke runs).
        datalist: a MONAI datalist JSON of your own (``training``/``validation``/``test`` sections of
            ``{"image", "label", "mask"[, "gaze"]}`` entries, paths relative to its folder) to run on instead of
            the bundle's generated dataset. Checked before any work (:func:`monai_kdx.data.check_datalist`): the
            classes, the dimensionality and the channels are read from it. The lesion masks choose and score the
            explanations and, without gaze heatmaps, guide the saliency stage.
        tracking_uri: MLflow tracking URI; default ``sqlite:///<output_dir>/mlruns.db``. Checked before any
            work (an unreachable server fails at once).
        experiment_name: the MLflow experiment; default the bundle's name.
        restart: ignore a previous, interrupted run in ``output_dir`` and start over.
        time_budget: seconds for the whole job (default :data:`DEFAULT_TIME_BUDGET`; ``None`` in quick mode),
            the explain stage's expected time kept aside (:meth:`estimate_explain`) and the rest shared among the
            training stages (:data:`BUDGET_SHARES`): each stops before overrunning its share of the time left (and on
            a validation plateau or the epoch cap before that).
        verbose: leave MONAI's and ignite's logs, library warnings and the bundles' bars on the console; by default
            the console shows one line per stage as it starts and ends, a progress bar per training stage and the
            report, and the rest goes to ``<output_dir>/logs/<stage>.log`` (:class:`monai_kdx.apps.console.Console`).
        overrides: bundle config overrides for every stage (e.g. ``max_epochs=3``; ``resize_to=N`` resamples every
            image, mask and gaze map to side length N, so a datalist of several image shapes runs).

    Raises:
        ValueError: ``output_dir`` holds a pipeline started with other settings (and ``restart`` is false), or a
            time budget that is not positive.
        monai_kdx.data.DatalistError: a bad ``datalist`` entry (one line naming the section, the entry and the
            file), images of several shapes, no lesion masks, or a ``bundle`` of another dimensionality.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike = "runs/demo",
        bundle: str | None = None,
        quick: bool = False,
        tracking_uri: str | None = None,
        experiment_name: str | None = None,
        restart: bool = False,
        time_budget: float | None | str = "default",
        datalist: str | os.PathLike | None = None,
        verbose: bool = False,
        **overrides: Any,
    ) -> None:
        resized = overrides.get("resize_to") is not None
        data = None if datalist is None else check_main_job_datalist(datalist, bundle, resized)
        self.stage_overrides: dict[str, dict[str, Any]] = {}
        self.skipped_stages: dict[str, str] = {}  # stage -> why the data does not allow it
        self.lesion_masks = data is None or "mask" in data.keys
        self.datalist_summary = data
        if data is not None:
            bundle = bundle or BUNDLE_FOR_DIMS[data.spatial_dims]
            overrides = {**datalist_overrides(data), **overrides}
            if "gaze" not in data.keys and self.lesion_masks:  # the saliency pulled toward the lesion masks instead
                self.stage_overrides["saliency"] = {"saliency_target_key": "mask"}  # read with the images too
            elif "gaze" not in data.keys:
                self.skipped_stages["saliency"] = "the datalist has neither gaze heatmaps nor lesion masks to guide it"
            if not self.lesion_masks:
                self.stage_overrides["explain"] = {"lesion_masks": False}
        bundle = bundle or "brain_mri_3d"
        bundle_path(bundle)  # an unknown bundle fails here
        if time_budget == "default":
            time_budget = None if quick else DEFAULT_TIME_BUDGET
        check_stopping(None, time_budget=time_budget)
        self.time_budget = None if time_budget is None else float(time_budget)
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
            "time_budget": self.time_budget,
            "overrides": {key: repr(value) for key, value in sorted(self.overrides.items())},
        }
        self.state_path = os.path.join(self.output_dir, STATE_FILE)
        self.console = Console(os.path.join(self.output_dir, "logs"), verbose=verbose)
        self.state = self._load_state(restart)
        self._reserve: float | None = None  # seconds kept for the explain stage (estimate_explain)
        self._reserved_at = -math.inf  # when it was measured (time.perf_counter)
        self._choice: dict[str, Any] | None = None  # the explanation this run's distillation stage chose
        self._stage_start: float | None = None  # when the running stage started (its time counts as spent)

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

    @property
    def models(self) -> list[ModelEntry]:
        """The models this pipeline trains: those of :data:`MODELS` whose stage the data allows."""
        return [entry for entry in MODELS if entry.stage not in self.skipped_stages]

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
            **self.stage_overrides.get(stage, {}),
        }

    def run_params(self) -> dict[str, Any]:
        """What defines this pipeline, as the parent run's params: the data, the architectures, the budget and the
        overrides."""
        parser = self.parser(["train_teacher.yaml"], "teacher")
        data = self.overrides.get("datalist")
        params = {
            "bundle": self.bundle,
            "quick": self.quick,
            "data": data if data else f"generated {parser.get_parsed_content('dataset_kind')}",
            "num_classes": parser.get_parsed_content("num_classes"),
            "spatial_dims": parser.get_parsed_content("spatial_dims"),
            "teacher_network": parser.get_parsed_content("teacher_def#network"),
            "student_network": parser.get_parsed_content("student_def#network"),
            "time_budget": self.time_budget,
        }
        if not data:
            params.update(n_samples=parser.get_parsed_content("n_samples"))
            params.update(spatial_size=parser.get_parsed_content("spatial_size"))
        return {**params, **{key: value for key, value in self.overrides.items() if key != "datalist"}}

    @property
    def workload(self) -> Workload:
        """The images and splits the stages run on (the generated dataset's, or the checked datalist's)."""
        return Workload.of(self.parser(["train_teacher.yaml"], "teacher"), self.datalist_summary)

    def estimate_explain(self, method: str | None = None) -> float:
        """Seconds the explain stage is expected to take on this machine.

        Each model's network (the teacher's, the student's) is timed untrained (the cost does not depend on the
        weights) on one image of the workload: one explanation and one forward pass. The estimate is the test images
        times each model's explanation, its faithfulness curves (``faithfulness_cases`` x 4 x (``faithfulness_steps``
        + 1) forward passes), and, while the explanation is not chosen, the teacher's maps by every candidate on the
        validation split; plus the rest of the stage's work (:data:`EXPLAIN_OVERHEAD`).

        Args:
            method: the chosen explanation; None: not chosen yet (with lesion masks every candidate is timed and the
                dearest counts; without, there is no choice: the bundle's ``explanation_method``).

        Returns:
            The estimate in seconds.
        """
        parser = self.parser(["train_teacher.yaml", "explain.yaml"])
        setting = parser.get_parsed_content
        choosing = method is None and self.lesion_masks
        methods = list(EXPLANATION_CANDIDATES) if choosing else [method or setting("explanation_method")]
        workload, device, smoothing = self.workload, setting("device"), setting("explanation_smoothing")
        limit, faithful = setting("explain_limit"), setting("faithfulness_cases")
        cases = workload.counts["test"] if limit is None else min(int(limit), workload.counts["test"])
        faithful = cases if faithful is None else min(int(faithful), cases)
        forwards = faithful * 4 * (int(setting("faithfulness_steps")) + 1)
        timed: dict[str, tuple[dict[str, float], float]] = {}  # a network's spec → its explanations, its forward
        per_method, choice = dict.fromkeys(methods, 0.0), 0.0
        for entry in self.models:  # the pruned model is timed as its source, unpruned: at most as fast
            spec = self.parser(entry.configs, entry.stage).get_parsed_content("network_spec")
            key = json.dumps(spec, sort_keys=True, default=str)
            if key not in timed:
                image = workload.images(1, device)
                forward = step_seconds(spec, image, int(setting("num_classes")), train=False)
                timed[key] = explanation_seconds(spec, workload, methods, smoothing, device), forward
            explanations, forward = timed[key]
            for m in methods:
                per_method[m] += cases * explanations[m] + forwards * forward
            if entry.name == "teacher" and choosing:
                choice = workload.counts["validation"] * sum(explanations.values())
        seconds = max(per_method.values()) + choice
        per_case, fixed = EXPLAIN_OVERHEAD
        return seconds + per_case * cases * len(self.models) + fixed

    @property
    def explanation(self) -> dict[str, Any] | None:
        """The explanation the distillation stage chose (:func:`_choose_explanation`): this run's, or the one in its
        record; None before."""
        return self._choice or self.state["stages"].get("distill", {}).get("explanation")

    @explanation.setter
    def explanation(self, choice: dict[str, Any]) -> None:
        self._choice = choice
        self.measure_explain(max_age=0.0)  # the explain stage's time, now of the chosen explanation alone

    @property
    def explain_reserve(self) -> float:
        """The seconds kept aside for the explain stage (:meth:`measure_explain`); 0 once it has completed or
        without a budget."""
        if self.time_budget is None or self.completed("explain"):
            return 0.0
        if self._reserve is None:
            self.measure_explain()
        return self._reserve

    def measure_explain(self, max_age: float = 60.0) -> None:
        """Estimate the explain stage's time again (:meth:`estimate_explain`, with the :attr:`explanation` chosen so
        far) unless the last estimate is younger than ``max_age`` seconds: each training stage takes its budget
        against the machine's speed as it is when it starts (a shared machine's speed drifts); nothing without a
        budget."""
        if self.time_budget is None or time.perf_counter() - self._reserved_at < max_age:
            return
        self._reserve = self.estimate_explain((self.explanation or {}).get("method"))
        self._reserved_at = time.perf_counter()

    @property
    def training_stages(self) -> list[str]:
        """The training stages this pipeline runs (of :data:`BUDGET_SHARES`: those the data allows), in order."""
        return [stage for stage in BUDGET_SHARES if stage not in self.skipped_stages]

    def stage_budget(self, stage: str) -> float | None:
        """The seconds of training ``stage`` may take.

        Its share (:data:`BUDGET_SHARES`) among the training stages left of the time left, the explain stage's
        :attr:`explain_reserve` kept aside (the time of completed stages, from ``pipeline.json``, and of the running
        one is spent); at least 1 s. When it is spent (a machine slower than the budget assumes) the stage still
        trains the bundles' ``min_epochs`` epochs, and the job ends after its budget.

        Returns:
            The seconds; None without a budget, or for the explain stage, which is not cut short.
        """
        if self.time_budget is None or stage not in self.training_stages:
            return None
        spent = sum(record.get("seconds", 0.0) for record in self.state["stages"].values())
        if self._stage_start is not None:
            spent += time.perf_counter() - self._stage_start
        left = self.training_stages[self.training_stages.index(stage) :]
        available = self.time_budget - spent - self.explain_reserve
        return max(available * BUDGET_SHARES[stage] / sum(BUDGET_SHARES[s] for s in left), 1.0)

    def check_budget(self, stages: Sequence[str]) -> dict[str, float]:
        """Refuse, before any work, a budget that the explain stage's :attr:`explain_reserve` exhausts, or whose share
        for a training stage would not fit one epoch (the budget covers the whole job, across resumes).

        One epoch is estimated from one timed training step of the stage's network on a batch of the bundle's
        size (a few seconds in all), times the training and validation batches of an epoch.

        Args:
            stages: the stages this run will run.

        Returns:
            stage → the estimated seconds of one epoch.

        Raises:
            ValueError: naming the explain stage's estimate, or the stage, its share and the estimated epoch.
        """
        if self.time_budget is None:
            return {}
        reserve = self.explain_reserve
        available = self.time_budget - reserve
        if available <= 0:
            raise ValueError(
                f"the time budget of {self.time_budget:.0f} s is less than the explain stage alone is expected to "
                f"take (about {reserve:.0f} s on this machine); raise the time budget (--time-budget) or use "
                "smaller data."
            )
        kept = f" once about {reserve:.0f} s are kept for the explain stage" if reserve else ""
        total = sum(BUDGET_SHARES[stage] for stage in self.training_stages)
        workload, estimates = self.workload, {}
        for stage in stages:
            entry = next((entry for entry in self.models if entry.stage == stage), None)
            if entry is None:
                continue
            estimates[stage] = estimate_epoch_seconds(self.parser(entry.configs, stage), workload, entry.frozen)
            share = available * BUDGET_SHARES[stage] / total
            if share < estimates[stage]:
                raise ValueError(
                    f"the time budget of {self.time_budget:.0f} s leaves stage {stage!r} about {share:.0f} s{kept}, "
                    f"less than one epoch (about {estimates[stage]:.0f} s on this machine); raise the time budget "
                    "(--time-budget) or use smaller data."
                )
        return estimates

    def run_in(
        self,
        run_id: str,
        stage: str,
        configs: Sequence[str],
        engines: Sequence[str],
        progress: bool = False,
        **extra: Any,
    ):
        """One bundle run logging into the existing run ``run_id`` (reopened: the bundle's handler ends it); with
        ``progress``, its trainer draws the stage's bar on the console."""
        self.tracker.reopen(run_id)
        name = self.tracker.client.get_run(run_id).info.run_name
        attach = self.console.training_progress(stage) if progress else None
        settings = {**self.bundle_settings(stage, name), **extra}
        return run_bundle(self.bundle, list(configs), engines, on_initialized=attach, **settings)

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
        with OutputLock(self.output_dir), self.console.capture("pipeline"):
            last = STAGES.index(until) if until else len(STAGES) - 1
            first = next((i for i, stage in enumerate(STAGES) if not self.completed(stage)), len(STAGES))
            self.check_budget(STAGES[first : last + 1])  # what _run runs: a stage run again reruns those after it
            if self.explain_reserve:
                self.console.line(
                    f"time budget {self.time_budget:.0f} s: about {self.explain_reserve:.0f} s kept for the explain "
                    "stage (estimated on this machine), the rest shared by the training stages"
                )
            return self._run(last)

    def _run(self, last: int) -> PipelineResult:
        first = next((i for i, stage in enumerate(STAGES) if not self.completed(stage)), len(STAGES))
        if first < len(STAGES) and STAGES[first] in self.state["stages"]:
            self.console.line(f"{STAGES[first]}: outputs changed since it completed {self.changed(STAGES[first])}, "
                              "running it again")  # fmt: skip
        for stage in STAGES[first:]:  # a stage run again invalidates what came after it
            self.state["stages"].pop(stage, None)
        skipped = list(STAGES[: min(first, last + 1)])
        if self.state["parent_run_id"] is None:
            self.state["parent_run_id"] = self.tracker.start_parent(
                self.experiment_name,
                run_name="pipeline",
                params=self.run_params(),
                tags={"monai_kdx.pipeline": self.output_dir},
            )
            self._save_state()
        else:
            self.tracker.reopen(self.state["parent_run_id"])
        parent = self.state["parent_run_id"]
        for stage in skipped:
            run = self.state["stages"][stage].get("run_id")
            self.console.line(f"{stage}: completed earlier" + (f" (run {run}), skipped" if run else ", skipped"))
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
        if stage in self.skipped_stages:
            self.console.line(f"{stage}: skipped, {self.skipped_stages[stage]}")
            self.state["stages"][stage] = {"metrics": {}, "skipped": self.skipped_stages[stage], "outputs": {}}
            self._save_state()
            return
        for entry in stage_inputs(stage):  # before any run or file is created
            if entry in self.models:
                check_checkpoint(self.path(entry.checkpoint), stage, f"{entry.description} checkpoint")
        for relative in stage_outputs(stage):  # never pick up a file this run did not write
            if os.path.isfile(self.path(relative)):
                os.remove(self.path(relative))
        # the distillation stage measures and says its budget once it has chosen the explanation (in its time)
        shows_budget = stage in self.training_stages and stage != "distill"
        if shows_budget:
            self.measure_explain()  # against the machine's speed as the stage starts
        budget = self.stage_budget(stage) if shows_budget else None
        self.console.line(
            f"{stage}: {STAGE_TEXT[stage]}" + (f", at most {budget:.0f} s" if budget else "")
            + f" (log: {self.console.shown_path(stage)})"
        )  # fmt: skip
        start = time.perf_counter()
        run_id = self.tracker.start_child(parent, stage)
        try:
            self._stage_start = start
            with self.console.capture(stage):
                record = STAGE_FUNCTIONS[stage](self, run_id)
        except BaseException as error:
            self.tracker.end(run_id, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
            raise
        finally:
            self._stage_start = None
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
        self.tracker.log_metrics(parent, {f"seconds/{stage}": record["seconds"]})  # the stage's metrics: its run
        shown = key_metrics(record["metrics"], record.get("training"), record.get("shown"))
        self.console.line(f"{stage}: done in {record['seconds']:.0f} s" + (f" · {shown}" if shown else ""))


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
    budget = pipeline.stage_budget(entry.stage)
    extra = {**extra, **({"time_budget": budget} if budget is not None else {})}
    engines = ["train#trainer", "validate#evaluator"]
    train = pipeline.run_in(run_id, entry.stage, entry.configs, engines, progress=True, **extra)
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
    """The student distilled from the teacher; first, the explanation the report shows is chosen on the teacher's
    validation maps (:func:`_choose_explanation`; its time is the stage's), kept in the stage's record, and the
    explain stage's time kept aside for it alone, so the training stages share the time the other candidates
    would have taken."""
    choice = pipeline.explanation = _choose_explanation(pipeline)
    budget = pipeline.stage_budget("distill")
    limit = f"; training at most {budget:.0f} s" if budget else ""
    pipeline.console.line(f"distill: the report will show {choice['method']} maps{limit}")
    return {**_train_and_test(pipeline, run_id, model("student")), "explanation": choice}


def _stage_prune(pipeline: Pipeline, run_id: str) -> dict[str, Any]:
    entry = model("pruned")
    engines = ["train#trainer", "validate#evaluator", "test#evaluator"]
    budget = pipeline.stage_budget(entry.stage)
    extra = {"time_budget": budget} if budget else {}
    result = pipeline.run_in(run_id, entry.stage, entry.configs, engines, progress=True, **extra)
    return {
        "metrics": result.metrics,
        "models": pipeline.tracker.registered_models(run_id),
        "training": _training_record(pipeline, entry.stage),
        "shown": ["prune_params_before", "prune_params", "val_accuracy", "test_accuracy"],
    }


def _stage_saliency(pipeline: Pipeline, run_id: str) -> dict[str, Any]:
    """The distilled student fine-tuned with its saliency pulled toward the gaze maps, or the lesion masks without
    them (saliency_train.yaml), the saliency being the report's explanation (:func:`_guided_saliency`); a
    ``saliency_method`` the user set is kept."""
    student = pipeline.path(model("student").checkpoint)  # a plain value: paths are never pasted into expressions
    method = pipeline.overrides.get("saliency_method") or _guided_saliency(_explanation_choice(pipeline)["method"])
    return _train_and_test(pipeline, run_id, model("saliency"), start_checkpoint=student, saliency_method=method)


def _guided_saliency(explanation: str) -> str:
    """The differentiable saliency the saliency stage pulls toward the gaze maps when the report shows
    ``explanation``: one the saliency losses compute (a CAM mode, fused over the stages as the report fuses it;
    LRP) guides itself; another pixel attribution (integrated gradients) guides the input gradient, its one-pass,
    differentiable counterpart at the same level.

    Measured on the demo's student (brain, 3 training seeds): input-gradient guidance kept 0.975 test accuracy on
    average (student 0.981) and moved the report's integrated-gradient maps toward gaze (KL 0.87-0.94x, NSS
    1.05-1.17x); guiding the fused Grad-CAM instead left them where they were (KL 0.96x, NSS 1.01x) at 0.950."""
    return explanation if explanation in SALIENCY_METHODS else "input_gradient"


def _explanation_choice(pipeline: Pipeline) -> dict[str, Any]:
    """The explanation the distillation stage chose (:func:`_choose_explanation`)."""
    if pipeline.explanation is None:
        raise RuntimeError("no explanation was chosen: the distillation stage chooses it.")
    return pipeline.explanation


def _explain_settings(pipeline: Pipeline, entry: ModelEntry) -> dict[str, Any]:
    """The overrides that make explain.yaml explain ``entry`` from its file."""
    if entry.pruned:  # the weights are in the file: no CheckpointLoader (the test handlers' first)
        network = "$monai_kdx.pruning.load_pruned(@pruned_path).to(@device)"
        path = pipeline.path(entry.checkpoint)  # ckpt_path too: the file the run's params name
        return {"pruned_path": path, "ckpt_path": path, "network": network, "handlers#0#_disabled_": True}
    return {"ckpt_path": pipeline.path(entry.checkpoint)}


def _choose_explanation(pipeline: Pipeline) -> dict[str, Any]:
    """The candidate whose maps of the teacher point at the lesion most often on the validation split (ties: the
    first candidate, the cheaper), with every candidate's pointing game and its 95% interval; pixel attributions
    are smoothed as the explain stage smooths them (``explanation_smoothing``)."""
    from monai_kdx.metrics import bootstrap_interval, pointing_game
    from monai_kdx.transforms import HierarchicalExplanationd

    teacher = pipeline.load_model(model("teacher"))
    parser = pipeline.parser(["train_teacher.yaml", "explain.yaml"])
    transform = parser.get_parsed_content("validate#preprocessing")
    default = parser.get_parsed_content("explanation_method")
    smoothing = parser.get_parsed_content("explanation_smoothing")
    chosen = {"method": default, "smoothing": smoothing, "scores": {}}
    if not pipeline.lesion_masks:
        return {**chosen, "reason": "the datalist has no lesion masks to choose by"}
    samples = [transform(item) for item in parser.get_parsed_content("validate#dataset").data]
    samples = [sample for sample in samples if float(sample["mask"].sum()) > 0]
    if not samples:
        return {**chosen, "reason": "no validation case has a lesion to choose by"}
    scores = {}
    for method in EXPLANATION_CANDIDATES:
        explain = HierarchicalExplanationd("image", teacher, mode=method, target_key="label", smoothing=smoothing)
        hits = [
            float(pointing_game(explain(sample)["cam"][None], (sample["mask"][None] > 0).float())[0])
            for sample in samples
        ]
        scores[method] = bootstrap_interval(hits)
    best = max(EXPLANATION_CANDIDATES, key=lambda method: scores[method]["value"])
    return {**chosen, "method": best, "scores": scores}


def _stage_explain(pipeline: Pipeline, run_id: str) -> dict[str, Any]:
    metrics, explain_runs, per_model = {}, {}, {}
    folders = {}
    choice = _explanation_choice(pipeline)
    expected = pipeline.explain_reserve if pipeline.time_budget is not None else None  # before it completes
    why = choice.get("reason") or "the best pointing game of the teacher on the validation split"
    pipeline.console.line(f"explain: {choice['method']} maps ({why})")
    names = {method: method.replace("+", "p") for method in choice["scores"]}  # MLflow: no "+" in metric names
    scores = {f"validation_pointing_game/{names[m]}": score["value"] for m, score in choice["scores"].items()}
    pipeline.tracker.log_metrics(run_id, scores)
    pipeline.tracker.client.log_param(run_id, "explanation_method", choice["method"])
    pipeline.tracker.client.log_param(pipeline.state["parent_run_id"], "explanation_method", choice["method"])
    for entry in pipeline.models:
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
            explanation_method=choice["method"],
            explanation_smoothing=choice["smoothing"],
            **_explain_settings(pipeline, entry),
        )
        pipeline.tracker.end(child, "FINISHED")
        explain_runs[entry.name] = child
        per_model[entry.name] = result.metrics
        metrics.update({f"{entry.name}_{key}": value for key, value in result.metrics.items()})
    models = {entry.name: pipeline.load_model(entry) for entry in pipeline.models}
    training = {e.name: pipeline.state["stages"].get(e.stage, {}).get("training", {}) for e in pipeline.models}
    summary, report = write_summary(
        models,
        _test_samples(pipeline, 3),
        pipeline.path("report"),
        case_tables={name: read_case_table(os.path.join(folder, "cases.csv")) for name, folder in folders.items()},
        explain_metrics=per_model,
        explanation_folders={name: os.path.join(folder, "maps") for name, folder in folders.items()},
        training=training,
        gaze=_test_gaze(pipeline),
        title=f"monai_kdx pipeline report: {pipeline.bundle}",
        notes=_choice_text(choice)
        + "\n\n"
        + data_notes(pipeline.parser(model("teacher").configs).get_parsed_content("datalist"))
        + (
            "\n\nThe saliency-guided student was pulled toward the lesion masks: the datalist has no gaze heatmaps."
            if "saliency" in pipeline.stage_overrides
            else ""
        )
        + "".join(f"\n\nNot run: the {stage} stage, as {why}." for stage, why in pipeline.skipped_stages.items())
        + ("" if pipeline.lesion_masks else "\n\nThe datalist has no lesion masks: localization is not scored.")
        + f"\n\nMLflow: `{pipeline.tracking_uri}`, experiment `{pipeline.experiment_name}`, parent run "
        f"`{pipeline.state['parent_run_id']}`.",
        method=choice["method"],
        smoothing=choice["smoothing"],
    )
    # the comparison of the four models, once, in the parent run (each model's own runs hold the rest)
    comparison = {
        f"{row['model'].replace(' ', '_')}/{key}": value
        for row in summary
        for key, value in row.items()
        if not key.endswith("_n")  # the case counts are in the report
    }
    pipeline.tracker.log_metrics(pipeline.state["parent_run_id"], comparison)
    pipeline.tracker.client.log_artifacts(run_id, pipeline.path("report"), "report")
    pipeline.tracker.client.log_artifacts(pipeline.state["parent_run_id"], pipeline.path("report"), "report")
    return {
        "metrics": metrics,
        "explain_runs": explain_runs,
        "summary": summary,
        "report": report,
        "explanation": choice,
        "expected_seconds": expected,
        "shown": [f"{name}_{'pointing_game' if pipeline.lesion_masks else 'deletion_auc'}" for name in models],
    }


def _choice_text(choice: Mapping[str, Any]) -> str:
    """The report's paragraph on which explanation it shows and why."""
    if not choice["scores"]:
        return f"The maps are **{choice['method']}**, the bundle's default: {choice['reason']}."
    listed = ", ".join(
        f"{method} {score['value']:.3f} [{score['low']:.2f}, {score['high']:.2f}]"
        for method, score in sorted(choice["scores"].items(), key=lambda item: -item[1]["value"])
    )
    n = next(iter(choice["scores"].values()), {}).get("n", 0)
    return (
        f"The maps are **{choice['method']}**: of the candidates, the one whose maps of the teacher point at the "
        f"lesion most often on the validation split ({n} cases with a lesion; pointing game and 95% interval: "
        f"{listed}). No single method localizes best on every dataset and network, so the main job chooses on data "
        "it does not report on."
    )


def _test_gaze(pipeline: Pipeline) -> dict[str, tuple[str, Any]]:
    """case → (gaze heatmap file, fixations) of the test entries that have them (the report's gaze scores)."""
    from monai_kdx.transforms import case_name

    parser = pipeline.parser(["train_teacher.yaml", "explain.yaml"])
    root = parser.get_parsed_content("data_root")
    return {
        case_name(entry["image"], root): (entry["gaze"], entry["fixations"])
        for entry in parser.get_parsed_content("test#dataset").data
        if isinstance(entry.get("gaze"), str) and entry.get("fixations")
    }


def _test_samples(pipeline: Pipeline, limit: int) -> list[Mapping[str, Any]]:
    """Up to ``limit`` test samples with a lesion (image, label, mask), preprocessed as in explain.yaml (without lesion
    masks: the first ones)."""
    parser = pipeline.parser(["train_teacher.yaml", "explain.yaml"])
    transform = parser.get_parsed_content("validate#preprocessing")
    samples = []
    for item in parser.get_parsed_content("test#dataset").data:
        sample = transform(item)
        if not pipeline.lesion_masks or float(sample["mask"].sum()) > 0:
            samples.append(sample)
        if len(samples) == limit:
            break
    return samples


STAGE_TEXT = {
    "teacher": "training the teacher",
    "distill": "distilling the student from the teacher",
    "prune": "pruning the student by relevance, fine-tuning",
    "saliency": "fine-tuning the student with saliency guidance",
    "explain": "explaining the four models, writing the report",
}
"""What each stage does, on its opening line."""

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
