"""DistillationTrainer: MONAI's ``SupervisedTrainer`` with a frozen teacher and a distillation loss.

The training iteration is MONAI's own (AMP, gradient accumulation, events, decollation): the
trainer only replaces the *inferer* with one that also runs the teacher and captures the layers the
loss needs, and the *loss function* with one that evaluates the :class:`DistillationLoss` and puts
every named part into ``engine.state.output`` (so handlers can log ``task``, ``kd``, ``feature``,
``attention``, … next to ``loss``, the total).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from ignite.engine import EventEnum
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.inferers import Inferer, SimpleInferer
from torch import nn

from monai_kdx.losses.distillation import DistillationLoss, DistillationTerm
from monai_kdx.networks import FeatureCapture, num_classes_of, spatial_dims_of

__all__ = ["DistillationTrainer", "DistillationEvents"]


class DistillationEvents(EventEnum):
    """Events a :class:`DistillationTrainer` fires in every iteration."""

    TEACHER_FORWARD_COMPLETED = "teacher_forward_completed"


class _TeacherStudentInferer:
    """Runs the teacher (eval mode, no autograd, inside the caller's autocast context) and then the
    student, capturing the layers the distillation loss needs from each."""

    def __init__(
        self,
        inferer: Inferer,
        student: nn.Module,
        teacher: nn.Module,
        loss: DistillationLoss,
        trainer: DistillationTrainer,
    ):
        self.inferer = inferer
        self.teacher = teacher
        # built once (this validates the layer paths); re-entered every iteration, hooks only inside `with`
        self.student_capture = FeatureCapture(student, loss.student_layers)
        self.teacher_graph = loss.needs_teacher_graph
        self.teacher_capture = FeatureCapture(teacher, loss.teacher_layers, detach=not self.teacher_graph)
        self.trainer = trainer
        self.student_outputs: dict[str, torch.Tensor] = {}
        self.teacher_outputs: dict[str, torch.Tensor] = {}
        self.teacher_graph_outputs: dict[str, torch.Tensor] | None = None

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.teacher.eval()
        teacher_inputs = inputs
        if self.teacher_graph and not any(p.requires_grad for p in self.teacher.parameters()):
            teacher_inputs = inputs.detach().requires_grad_(True)  # a frozen teacher: start the graph here
        with torch.set_grad_enabled(self.teacher_graph), self.teacher_capture as teacher_features:
            teacher_logits = self.inferer(teacher_inputs, self.teacher, *args, **kwargs)
        graph = {"logits": teacher_logits, **teacher_features}
        self.teacher_outputs = {name: value.detach() for name, value in graph.items()}
        self.teacher_graph_outputs = graph if self.teacher_graph else None
        teacher_features.clear()
        self.trainer.fire_event(DistillationEvents.TEACHER_FORWARD_COMPLETED)
        with self.student_capture as student_features:
            student_logits = self.inferer(inputs, network, *args, **kwargs)
        self.student_outputs = {"logits": student_logits, **student_features}
        student_features.clear()
        return student_logits


class _DistillationObjective:
    """The trainer's ``loss_function(pred, target)``: evaluates the distillation loss on the outputs
    the inferer captured and records each part in ``engine.state.output``."""

    def __init__(self, loss: DistillationLoss, inferer: _TeacherStudentInferer, trainer: DistillationTrainer):
        self.loss = loss
        self.inferer = inferer
        self.trainer = trainer

    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        inferer = self.inferer
        parts = self.loss(inferer.student_outputs, inferer.teacher_outputs, target, inferer.teacher_graph_outputs)
        output = self.trainer.state.output
        for name, value in parts.items():
            if name != "total":
                output[name] = value.detach()
        inferer.student_outputs, inferer.teacher_outputs, inferer.teacher_graph_outputs = {}, {}, None  # free maps
        return parts["total"]


class DistillationTrainer(SupervisedTrainer):
    """Train a student ``network`` from a frozen ``teacher_network`` with a distillation loss.

    Same arguments as :class:`monai.engines.SupervisedTrainer` (``train_handlers``,
    ``key_train_metric``, ``max_epochs``, ``amp``, …), plus the teacher. The teacher is kept in eval
    mode every iteration, runs without autograd in the student's autocast context (with autograd only
    when a term such as :class:`~monai_kdx.losses.ExplanationDistillationLoss` needs the teacher's
    gradients; its parameters still get none), and is never wrapped in DDP. Checkpoint the student (and
    the loss, which holds any adapters), not the teacher.

    Inputs are (B, C_in, H, W) or (B, C_in, H, W, D); the loss receives ``{"logits": (B, K), <layer>:
    (B, C_l, *spatial_l)}`` for each network. ``engine.state.output`` holds ``loss`` (the total) and each
    part by name, e.g. ``task``, ``kd``, ``feature``, ``attention``.

    Args:
        network: the student.
        teacher_network: the trained teacher (a plain module, not DDP).
        loss_function: a :class:`DistillationLoss`, or a single :class:`DistillationTerm` (used alone).
        inferer: how to run both networks on a batch (default :class:`monai.inferers.SimpleInferer`).
        event_names: extra events; :class:`DistillationEvents` are always registered.
        kwargs: the other arguments of :class:`monai.engines.SupervisedTrainer`.

    Raises:
        ValueError: before any training, when the teacher is wrapped in DDP/DataParallel, the two
            networks predict different numbers of classes or have different spatial dimensionality,
            a layer path does not exist (close matches listed), or the loss is not a distillation loss.
    """

    def __init__(
        self,
        network: nn.Module,
        teacher_network: nn.Module,
        loss_function: DistillationLoss | DistillationTerm,
        inferer: Inferer | None = None,
        event_names: Sequence[str | EventEnum | type[EventEnum]] | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(teacher_network, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            raise ValueError("teacher_network must be a plain module: the frozen teacher is never wrapped in DDP.")
        if isinstance(loss_function, DistillationTerm):
            loss_function = DistillationLoss({type(loss_function).__name__: loss_function})
        if not isinstance(loss_function, DistillationLoss):
            raise ValueError(
                f"loss_function must be a DistillationLoss or DistillationTerm, got {type(loss_function).__name__}."
            )
        _check_compatible(network, teacher_network)
        self.teacher_network = teacher_network
        self.distillation_loss = loss_function
        self._distill_inferer = _TeacherStudentInferer(  # validates the layer paths (close matches listed)
            inferer or SimpleInferer(), network, teacher_network, loss_function, self
        )
        super().__init__(
            network=network,
            loss_function=_DistillationObjective(loss_function, self._distill_inferer, self),
            inferer=self._distill_inferer,
            event_names=[*(event_names or []), DistillationEvents],
            **kwargs,
        )
        if any(p.requires_grad for p in loss_function.parameters()):
            self.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self._average_loss_gradients)

    def _average_loss_gradients(self, engine: DistillationTrainer) -> None:
        """Under DDP, average the gradients of the loss's own parameters (feature adapters) across
        ranks: they live outside the student's DDP wrapper, so DDP does not synchronize them."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        for parameter in self.distillation_loss.parameters():
            if parameter.grad is not None:
                dist.all_reduce(parameter.grad)
                parameter.grad /= dist.get_world_size()


def _check_compatible(student: nn.Module, teacher: nn.Module) -> None:
    checks: list[tuple[str, Callable[[nn.Module], int | None]]] = [
        ("spatial dimensionality", spatial_dims_of),
        ("number of classes", num_classes_of),
    ]
    for what, read in checks:
        student_value, teacher_value = read(student), read(teacher)
        if None not in (student_value, teacher_value) and student_value != teacher_value:
            raise ValueError(f"student and teacher differ in {what}: student {student_value}, teacher {teacher_value}.")
