"""Knowledge distillation losses: logits (Hinton), feature hints (FitNets), attention transfer,
explanation distillation (student CAM vs teacher CAM), and a weighted sum of named terms.

Every term works on *outputs*: a mapping with the network's ``"logits"`` (B, C) and, for each layer
path the term asks for in ``student_layers``/``teacher_layers``, that layer's feature map
(B, C_l, H, W) in 2D or (B, C_l, H, W, D) in 3D. The trainer captures exactly those layers (with
:class:`monai_kdx.networks.FeatureCapture`) and calls :class:`DistillationLoss`, which returns each
named part and their weighted ``"total"``. A term that needs the teacher's autograd graph (the
explanation term: a CAM needs the teacher's gradients) says so with ``needs_teacher_graph``; every
other term only ever sees detached teacher outputs.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from monai_kdx.networks import class_indices
from monai_kdx.registry import DISTILLATION_LOSSES

from .checks import check_layer_paths, check_positive, check_weight

__all__ = [
    "DistillationTerm",
    "KnowledgeDistillationLoss",
    "FeatureHintLoss",
    "AttentionTransferLoss",
    "ExplanationDistillationLoss",
    "DistillationLoss",
    "match_spatial",
]

Outputs = Mapping[str, torch.Tensor]


def match_spatial(source: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize a (B, C, *spatial) map to ``size`` (bilinear in 2D, trilinear in 3D; unchanged if equal)."""
    if tuple(source.shape[2:]) == tuple(size):
        return source
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[source.ndim - 2]
    return F.interpolate(source, size=tuple(size), mode=mode, align_corners=False)


class DistillationTerm(nn.Module):
    """Base of the terms :class:`DistillationLoss` combines.

    Subclasses set ``student_layers``/``teacher_layers`` (the module paths they need) and implement
    :meth:`from_outputs`. ``needs_teacher_graph = True`` asks the trainer to run the teacher with autograd
    (its parameters still get no gradient) and to pass this term the teacher outputs with their graph.
    """

    student_layers: tuple[str, ...] = ()
    teacher_layers: tuple[str, ...] = ()
    needs_teacher_graph: bool = False

    def from_outputs(self, student: Outputs, teacher: Outputs, target: torch.Tensor) -> torch.Tensor | dict[str, Any]:
        """The term's value (a scalar, or a dict of named scalars) from the two networks' outputs."""
        raise NotImplementedError


@DISTILLATION_LOSSES.register("kd")
class KnowledgeDistillationLoss(DistillationTerm):
    """Hinton's distillation loss on logits.

    ``(1 − α)·CE(y, z_s) + α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))``, the KL averaged over the batch
    (``batchmean``). The ``T²`` factor keeps the soft term's gradient scale independent of ``T``.

    Labels are class indices, (B,) or (B, 1); one-hot (B, C) labels are refused (convert them with
    ``argmax(dim=1)``; soft labels are not a KD target here).

    Args:
        temperature: ``T > 0``, finite; higher values soften both distributions.
        alpha: weight ``α`` in [0, 1] of the soft (teacher) term; ``1 − α`` weighs the hard labels.

    Raises:
        ValueError: ``temperature`` not a finite number > 0 or ``alpha`` outside [0, 1] (NaN included); at call
            time, labels that are not class indices of shape (B,) or (B, 1) (one-hot, another batch size,
            fractional values) or that are out of range for the logits' classes.

    Example:
        >>> loss = KnowledgeDistillationLoss(temperature=4.0, alpha=0.7)
        >>> value = loss(student_logits, teacher_logits, labels)   # (B, C), (B, C), (B,)
    """

    def __init__(self, temperature: float = 4.0, alpha: float = 0.5) -> None:
        super().__init__()
        self.temperature = check_positive("temperature", temperature)
        self.alpha = check_weight("alpha", alpha)
        if self.alpha > 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}.")

    def parts(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor) -> dict:
        """The two weighted parts: ``{"task": (1 − α)·CE, "kd": α·T²·KL}``.

        Args:
            student_logits: (B, C).
            teacher_logits: (B, C), no gradient needed.
            target: (B,) class indices, or (B, 1).

        Raises:
            ValueError: logits of different shapes; labels that are not (B,) or (B, 1) class indices in
                ``[0, C)`` (e.g. one-hot (B, C) labels).
        """
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(
                f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
                "differ: do the two networks predict the same classes?"
            )
        target = class_indices(
            target, student_logits.shape[0], student_logits.shape[1], name="target", device=student_logits.device
        )
        t = self.temperature
        task = F.cross_entropy(student_logits, target)
        kd = F.kl_div(
            F.log_softmax(student_logits / t, dim=1),
            F.log_softmax(teacher_logits.detach() / t, dim=1),
            reduction="batchmean",
            log_target=True,
        )
        return {"task": (1.0 - self.alpha) * task, "kd": self.alpha * t * t * kd}

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        parts = self.parts(student_logits, teacher_logits, target)
        return parts["task"] + parts["kd"]

    def from_outputs(self, student: Outputs, teacher: Outputs, target: torch.Tensor) -> dict:
        return self.parts(student["logits"], teacher["logits"], target)


def _adapter(spatial_dims: int, in_channels: int, out_channels: int) -> nn.Module:
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]
    return conv(in_channels, out_channels, kernel_size=1, bias=False)


@DISTILLATION_LOSSES.register("feature")
class FeatureHintLoss(DistillationTerm):
    """FitNets hint loss: ``½·‖u_h(x) − r(v_g(x))‖²`` (mean over elements) between a teacher layer and
    a student layer, with a learned 1×1 adapter ``r`` when the channel counts differ and linear
    interpolation of the student map when the spatial sizes differ.

    The adapter is a Conv2d or Conv3d picked from ``spatial_dims``; its parameters belong to this
    module, so give them to the optimizer (``list(student.parameters()) + list(loss.parameters())``).

    Args:
        student_layer: module path in the student, e.g. ``"features.3"``.
        teacher_layer: module path in the teacher, e.g. ``"features.denseblock2"``.
        student_channels: channels of the student layer's output.
        teacher_channels: channels of the teacher layer's output.
        spatial_dims: 2 or 3.

    Raises:
        ValueError: an empty layer path, channels that are not positive integers, ``spatial_dims`` not 1/2/3;
            at call time, maps whose channels or dimensionality do not match the declared ones.
    """

    def __init__(
        self, student_layer: str, teacher_layer: str, student_channels: int, teacher_channels: int, spatial_dims: int
    ) -> None:
        super().__init__()
        if isinstance(spatial_dims, bool) or spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}.")
        for name, channels in (("student_channels", student_channels), ("teacher_channels", teacher_channels)):
            if isinstance(channels, bool) or not isinstance(channels, numbers.Integral) or channels < 1:
                raise ValueError(f"{name} must be a positive integer, got {channels!r}.")
        self.student_layers = check_layer_paths("student_layer", [student_layer])
        self.teacher_layers = check_layer_paths("teacher_layer", [teacher_layer])
        self.spatial_dims = spatial_dims
        self.channels = (student_channels, teacher_channels)
        self.adapter = (
            nn.Identity()
            if student_channels == teacher_channels
            else _adapter(spatial_dims, student_channels, teacher_channels)
        )

    def forward(self, student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
        """Args: student_map (B, C_s, *spatial_s); teacher_map (B, C_t, *spatial_t)."""
        for name, tensor, channels in (
            ("student", student_map, self.channels[0]),
            ("teacher", teacher_map, self.channels[1]),
        ):
            if tensor.ndim != self.spatial_dims + 2 or tensor.shape[1] != channels:
                raise ValueError(
                    f"{name} feature map has shape {tuple(tensor.shape)}, expected (B, {channels}, "
                    f"{', '.join(['*'] * self.spatial_dims)}) for layer {getattr(self, name + '_layers')[0]!r}."
                )
        hint = match_spatial(self.adapter(student_map), teacher_map.shape[2:])
        return 0.5 * F.mse_loss(hint, teacher_map.detach())

    def from_outputs(self, student: Outputs, teacher: Outputs, target: torch.Tensor) -> torch.Tensor:
        return self(student[self.student_layers[0]], teacher[self.teacher_layers[0]])


def attention_map(feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Zagoruyko & Komodakis' spatial attention: ``Σ_c |A_c|^p``, flattened and L2-normalized.

    Args:
        feature: (B, C, *spatial).
        p: the exponent.

    Returns:
        (B, prod(spatial)) unit-norm rows (an all-zero map stays zero).
    """
    return F.normalize(feature.abs().pow(p).sum(dim=1).flatten(1), dim=1)


@DISTILLATION_LOSSES.register("attention")
class AttentionTransferLoss(DistillationTerm):
    """Attention transfer: ``β/2 · Σ_j ‖Q_s^j − Q_t^j‖₂`` over layer pairs ``j``, averaged over the batch,
    with ``Q = vec(Σ_c |A_c|^p) / ‖·‖₂``. Student maps are resized to the teacher's spatial size before
    the channel sum, so layers of different resolution can be paired.

    Args:
        student_layers: module paths in the student.
        teacher_layers: module paths in the teacher, one per student layer.
        p: exponent of the attention map (2 in the paper), finite and > 0.
        beta: weight ``β``, finite and >= 0. Each pair's distance between unit-norm maps lies in [0, 2], so
            ``β = 1`` keeps the term on the scale of the cross-entropy. (The paper's ``β ≈ 10³`` multiplies a mean
            of squared differences over the map's elements, a far smaller number: used with this norm, such a
            ``β`` lets the attention term swamp the task and KD terms.)

    Raises:
        ValueError: empty or unequal layer lists, a layer list given as a single string, ``p`` not a finite number
            > 0, ``beta`` negative, NaN or infinite.
    """

    def __init__(
        self, student_layers: Sequence[str], teacher_layers: Sequence[str], p: float = 2.0, beta: float = 1.0
    ) -> None:
        super().__init__()
        student_layers = check_layer_paths("student_layers", student_layers)
        teacher_layers = check_layer_paths("teacher_layers", teacher_layers)
        if not student_layers or len(student_layers) != len(teacher_layers):
            raise ValueError(
                f"attention transfer pairs layers one to one; got {len(student_layers)} student and "
                f"{len(teacher_layers)} teacher layers."
            )
        self.student_layers = student_layers
        self.teacher_layers = teacher_layers
        self.p = check_positive("p", p)
        self.beta = check_weight("beta", beta)

    def pair(self, student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
        """One pair's ``‖Q_s − Q_t‖₂`` averaged over the batch. Maps: (B, C, *spatial), same dimensionality."""
        if student_map.ndim != teacher_map.ndim:
            raise ValueError(
                f"cannot pair a {student_map.ndim - 2}D student map with a {teacher_map.ndim - 2}D teacher map."
            )
        student_q = attention_map(match_spatial(student_map, teacher_map.shape[2:]), self.p)
        teacher_q = attention_map(teacher_map.detach(), self.p)
        return (student_q - teacher_q).norm(dim=1).mean()

    def from_outputs(self, student: Outputs, teacher: Outputs, target: torch.Tensor) -> torch.Tensor:
        total = sum(
            self.pair(student[s], teacher[t]) for s, t in zip(self.student_layers, self.teacher_layers, strict=True)
        )
        return 0.5 * self.beta * total


@DISTILLATION_LOSSES.register("explanation")
class ExplanationDistillationLoss(DistillationTerm):
    """Explanation distillation: the student's class activation maps should match the teacher's at
    paired levels, so the compact student explains like its teacher.

    ``mean_j d(CAM_s^j, CAM_t^j)`` over layer pairs ``j``, each CAM min-max normalized per sample and the
    student's resized to the teacher's resolution; ``d`` is the mean squared (``"mse"``) or absolute
    (``"l1"``) difference. Both CAMs come from the shared CAM core
    (:func:`monai_kdx.explain.cam_from_features`): the student's with ``create_graph=True`` (so the loss
    trains the student, second order through the CAM weights), the teacher's from its own graph,
    detached. Maps explain the true class (``target="label"``) or the teacher's prediction
    (``target="teacher"``).

    Args:
        student_layers: module paths in the student.
        teacher_layers: module paths in the teacher, one per student layer.
        mode: CAM mode: ``"gradcam"``, ``"gradcam++"``, ``"layercam"`` or ``"activation"``.
        distance: ``"mse"`` or ``"l1"``.
        target: ``"label"`` or ``"teacher"``.

    Raises:
        ValueError: empty or unequal layer lists, a layer list given as a single string, an unknown mode,
            distance or target.
    """

    needs_teacher_graph = True

    def __init__(
        self,
        student_layers: Sequence[str],
        teacher_layers: Sequence[str],
        mode: str = "gradcam",
        distance: str = "mse",
        target: str = "label",
    ) -> None:
        super().__init__()
        from monai_kdx.explain.cam import CAM_MODES

        student_layers = check_layer_paths("student_layers", student_layers)
        teacher_layers = check_layer_paths("teacher_layers", teacher_layers)
        if not student_layers or len(student_layers) != len(teacher_layers):
            raise ValueError(
                f"explanation distillation pairs layers one to one; got {len(student_layers)} student and "
                f"{len(teacher_layers)} teacher layers."
            )
        if mode not in CAM_MODES:
            raise ValueError(f"unknown CAM mode {mode!r}; choose one of {CAM_MODES}.")
        if distance not in ("mse", "l1"):
            raise ValueError(f"distance must be 'mse' or 'l1', got {distance!r}.")
        if target not in ("label", "teacher"):
            raise ValueError(f"target must be 'label' or 'teacher', got {target!r}.")
        self.student_layers = student_layers
        self.teacher_layers = teacher_layers
        self.mode, self.distance, self.target = mode, distance, target

    def from_outputs(self, student: Outputs, teacher: Outputs, target: torch.Tensor) -> torch.Tensor:
        from monai_kdx.explain.cam import cam_from_features

        classes = teacher["logits"].detach().argmax(1) if self.target == "teacher" else target.view(-1).long()
        if self.mode != "activation" and not teacher["logits"].requires_grad:
            raise ValueError(
                "the teacher outputs carry no autograd graph: a gradient CAM of the teacher needs one "
                "(DistillationTrainer provides it for terms with needs_teacher_graph)."
            )
        with torch.enable_grad():
            teacher_maps = cam_from_features(
                {path: teacher[path] for path in self.teacher_layers}, teacher["logits"], classes, mode=self.mode
            )
        student_maps = cam_from_features(
            {path: student[path] for path in self.student_layers},
            student["logits"],
            classes,
            mode=self.mode,
            create_graph=True,
        )
        distance = F.mse_loss if self.distance == "mse" else F.l1_loss
        losses = []
        for s_path, t_path in zip(self.student_layers, self.teacher_layers, strict=True):
            teacher_map = teacher_maps[t_path].detach()
            losses.append(distance(match_spatial(student_maps[s_path], teacher_map.shape[2:]), teacher_map))
        return torch.stack(losses).mean()


class DistillationLoss(nn.Module):
    """A weighted sum of named distillation terms, e.g. logits + feature hints + attention.

    Args:
        terms: name → term (a :class:`DistillationTerm`, or a registered name of one built with
            default arguments). A term returning several parts (the KD term gives ``task`` and
            ``kd``) contributes each of them under its own name.
        weights: name → weight (default 1) for the terms, each a finite number >= 0.

    Returns (from ``forward``):
        A dict of scalar tensors: every part, and ``"total"`` (their weighted sum).

    Raises:
        ValueError: no terms, a weight for an unknown term, a negative, NaN or infinite weight, or two parts with
            the same name; at call time, labels that are not (B,) or (B, 1) class indices (e.g. one-hot).

    Example (bundle YAML):
        distill_loss:
          _target_: monai_kdx.losses.DistillationLoss
          terms:
            logits: {_target_: monai_kdx.losses.KnowledgeDistillationLoss, temperature: 4, alpha: 0.7}
            attention: {_target_: monai_kdx.losses.AttentionTransferLoss,
                        student_layers: [blocks.2], teacher_layers: [features.denseblock2]}
          weights: {attention: 0.5}
    """

    def __init__(self, terms: Mapping[str, DistillationTerm | str], weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        if not terms:
            raise ValueError("DistillationLoss needs at least one term.")
        built = {
            name: DISTILLATION_LOSSES.build(term) if isinstance(term, str) else term for name, term in terms.items()
        }
        for name, term in built.items():
            if not isinstance(term, DistillationTerm):
                raise ValueError(f"term {name!r} is a {type(term).__name__}, not a DistillationTerm.")
        unknown = sorted(set(weights or {}) - set(built))
        if unknown:
            raise ValueError(f"weights given for unknown terms {unknown}; terms: {sorted(built)}.")
        self.terms = nn.ModuleDict(built)
        self.weights = {name: check_weight(f"weights[{name!r}]", (weights or {}).get(name, 1.0)) for name in built}

    @property
    def student_layers(self) -> list[str]:
        """Every student layer path the terms need (deduplicated, in order)."""
        return list(dict.fromkeys(path for term in self.terms.values() for path in term.student_layers))

    @property
    def teacher_layers(self) -> list[str]:
        """Every teacher layer path the terms need (deduplicated, in order)."""
        return list(dict.fromkeys(path for term in self.terms.values() for path in term.teacher_layers))

    @property
    def needs_teacher_graph(self) -> bool:
        """Whether a term needs the teacher's autograd graph (the teacher then runs with autograd)."""
        return any(term.needs_teacher_graph for term in self.terms.values())

    def forward(
        self, student: Outputs, teacher: Outputs, target: torch.Tensor, teacher_graph: Outputs | None = None
    ) -> dict[str, torch.Tensor]:
        """Args: ``student``/``teacher``: ``{"logits": (B, C), <layer path>: (B, C_l, *spatial), ...}``;
        ``target``: (B,) or (B, 1) class indices (one-hot labels are refused: ValueError naming the expected
        shape), or None when no term reads labels; ``teacher_graph``: the teacher outputs with their autograd
        graph, given only to terms with ``needs_teacher_graph`` (default: ``teacher``)."""
        logits = student.get("logits")
        if target is not None and isinstance(logits, torch.Tensor) and logits.ndim == 2:
            target = class_indices(target, logits.shape[0], logits.shape[1], name="target", device=logits.device)
        parts: dict[str, torch.Tensor] = {}
        total = None
        for name, term in self.terms.items():
            given = teacher_graph if term.needs_teacher_graph and teacher_graph is not None else teacher
            value = term.from_outputs(student, given, target)
            named = value if isinstance(value, dict) else {name: value}
            for part, tensor in named.items():
                if part in parts or part == "total":
                    raise ValueError(f"two distillation parts are named {part!r}; rename the term {name!r}.")
                parts[part] = self.weights[name] * tensor
                total = parts[part] if total is None else total + parts[part]
        parts["total"] = total
        return parts
