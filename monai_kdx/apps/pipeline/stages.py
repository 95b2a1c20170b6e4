"""The main job's stages and models, in one table: which stage trains which model, with which bundle configs,
into which file. Everything else (inputs checked before a stage, outputs recorded after it, the models explained
and summarized) is read from here."""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["ModelEntry", "MODELS", "STAGES", "REPORT", "model", "stage_inputs", "stage_outputs"]


@dataclass(frozen=True)
class ModelEntry:
    """One model of the main job.

    Attributes:
        name: the model's name in the report and MLflow (``"teacher"``, ``"student"``, ...).
        stage: the stage that trains it.
        configs: the bundle configs that build it (its training stage's), laid on each other in order.
        checkpoint: its file, relative to the output folder.
        pruned: the file is a :func:`~monai_kdx.pruning.save_pruned` file (else a state dict of the configs'
            ``network``).
        description: what it is, for people.
        frozen: the config key of the network spec its training also runs forward without gradients (the teacher
            it learns from), counted in the estimate of an epoch; None: none.
    """

    name: str
    stage: str
    configs: tuple[str, ...]
    checkpoint: str
    pruned: bool = False
    description: str = ""
    frozen: str | None = None


MODELS: tuple[ModelEntry, ...] = (
    ModelEntry("teacher", "teacher", ("train_teacher.yaml",), os.path.join("models", "model.pt"),
               description="the teacher"),
    ModelEntry("student", "distill", ("train_teacher.yaml", "distill.yaml"), os.path.join("student", "model.pt"),
               description="the distilled student", frozen="teacher_def"),
    ModelEntry("pruned", "prune", ("train_teacher.yaml", "prune.yaml"), os.path.join("pruned", "model_pruned.pt"),
               pruned=True, description="the pruned student", frozen="network_spec"),  # the unpruned source
    ModelEntry("saliency", "saliency", ("train_teacher.yaml", "saliency_train.yaml"),
               os.path.join("saliency", "model.pt"), description="the saliency-guided student"),
)  # fmt: skip

STAGES = ("teacher", "distill", "prune", "saliency", "explain")
REPORT = os.path.join("report", "report.md")
"""The explain stage's last output: its presence marks the stage complete."""

# what each training stage starts from (the explain stage reads every model)
_STARTS_FROM = {"distill": "teacher", "prune": "student", "saliency": "student"}


def model(name: str) -> ModelEntry:
    """The entry of model ``name``.

    Raises:
        KeyError: no such model (the models are listed).
    """
    for entry in MODELS:
        if entry.name == name:
            return entry
    raise KeyError(f"no model {name!r}; models: {[entry.name for entry in MODELS]}.")


def stage_inputs(stage: str) -> list[ModelEntry]:
    """The models whose files a stage reads (checked before it starts)."""
    if stage == "explain":
        return list(MODELS)
    return [model(_STARTS_FROM[stage])] if stage in _STARTS_FROM else []


def stage_outputs(stage: str) -> list[str]:
    """The files a stage writes, relative to the output folder (their checksums are recorded)."""
    if stage == "explain":
        return [REPORT]
    return [entry.checkpoint for entry in MODELS if entry.stage == stage]
