"""Saliency regularization losses: pull a model's differentiable saliency toward where it should look.

Explanations are used during training only (inference is unchanged): the model's saliency for each
sample's TRUE class is computed with ``create_graph=True`` and compared with a target map, a
radiologist's eye-gaze heatmap or a lesion mask, so the loss trains the weights.

- :class:`SaliencyAlignmentLoss`: Grad-CAM (or another mode of the shared CAM core,
  :func:`monai_kdx.explain.cam_from_features`) at a chosen layer, or input gradients, compared with the
  target map by a divergence chosen by name (see :data:`SALIENCY_DIVERGENCES`).
- :class:`RightForTheRightReasonsLoss` (Ross et al. 2017): squared input gradients of the summed
  log-probabilities inside the region that should not matter.
- :class:`GAINLoss` (Li et al. 2018): attention mining (the true class's probability on the image with
  the attended region erased) plus pixel supervision of the CAM by the map.

All losses take a :class:`SaliencyContext` (``from_context``): the network, its input, logits and
captured feature maps of one training forward, the true classes and the target map. The training
handler :class:`monai_kdx.handlers.saliency.SaliencyGuidance` builds it inside any MONAI trainer; for
a plain loop, :meth:`SaliencyLoss.context` runs the forward and builds it.

Shapes: inputs (B, C, H, W) in 2D or (B, C, H, W, D) in 3D, finite (a NaN image would give a finite saliency
loss with NaN gradients: it is refused); target maps (B, 1, H, W) or (B, 1, H, W, D) with exactly the input's
spatial shape (no broadcasting), non-negative and finite. A sample whose target map is all zeros (e.g. no
lesion) contributes nothing; losses are means over the other samples, and a batch without any annotated sample
gives 0 (still connected to the graph, never NaN).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from monai_kdx.explain.activation import minmax_normalize
from monai_kdx.explain.cam import CAM_MODES, cam_from_features, fuse_maps, stage_layers
from monai_kdx.metrics.saliency import SALIENCY_EPS, saliency_kl, saliency_sim
from monai_kdx.networks import FeatureCapture, class_indices, float32_or_wider
from monai_kdx.registry import SALIENCY_LOSSES

from .checks import check_positive, check_weight

__all__ = [
    "SALIENCY_DIVERGENCES",
    "SALIENCY_METHODS",
    "SaliencyContext",
    "SaliencyLoss",
    "SaliencyAlignmentLoss",
    "RightForTheRightReasonsLoss",
    "GAINLoss",
    "check_inputs",
    "check_target_map",
    "input_gradient_saliency",
    "saliency_divergence",
]

SALIENCY_DIVERGENCES = ("kl", "nss", "cc", "sim", "mse")
"""Divergences of :class:`SaliencyAlignmentLoss`, each a per-sample loss (lower is better):

- ``"kl"``: KL(G ‖ S) of the sum-normalized maps, ``Σ G·log(ε + G/(S + ε))`` (:func:`monai_kdx.metrics.saliency_kl`).
- ``"nss"``: −NSS, ``−Σ z(S)·G / Σ G`` with ``z(S)`` the z-scored saliency; for a binary map G this is
  minus the NSS metric, for a gaze heatmap the fixation density weighs the positions.
- ``"cc"``: 1 − Pearson correlation (as :func:`monai_kdx.metrics.saliency_cc`, written with a gradient that
  stays finite for constant maps), in [0, 2].
- ``"sim"``: 1 − SIM, the histogram intersection of the sum-normalized maps
  (:func:`monai_kdx.metrics.saliency_sim`), in [0, 1].
- ``"mse"``: mean squared difference of the max-normalized maps (each divided by its maximum, so both in [0, 1]).
"""

SALIENCY_METHODS = (*CAM_MODES, "input_gradient", "lrp")
"""Saliency methods of :class:`SaliencyAlignmentLoss`: the CAM modes of the shared CAM core,
``"input_gradient"``: ``Σ_channels |∂y_c/∂x|``, and ``"lrp"``: the positive part of the input relevance of
:class:`monai_kdx.explain.LRPAttribution` with ``create_graph=True`` (its own forward, in eval mode)."""


@dataclass
class SaliencyContext:
    """What a saliency loss needs from one training forward pass.

    Attributes:
        network: the trained model (possibly DDP-wrapped).
        inputs: (B, C, H, W) or (B, C, H, W, D) input of the forward; ``requires_grad`` when a loss uses
            input gradients (``SaliencyLoss.needs_input_grad``).
        logits: (B, num_classes) output of that forward, with its autograd graph.
        features: layer path → (B, K, *spatial) feature map captured during that forward (the layers the
            loss lists in ``layers``).
        targets: (B,) true class of each sample.
        target_map: (B, 1, H, W) or (B, 1, H, W, D) non-negative target (gaze heatmap or lesion mask).
    """

    network: nn.Module
    inputs: torch.Tensor
    logits: torch.Tensor
    features: Mapping[str, torch.Tensor] = field(repr=False)
    targets: torch.Tensor
    target_map: torch.Tensor = field(repr=False)


def check_target_map(target_map: torch.Tensor, inputs: torch.Tensor, name: str = "target_map") -> torch.Tensor:
    """Validate a target map against the input it annotates and return it as a float tensor.

    Args:
        target_map: (B, 1, H, W) or (B, 1, H, W, D) map; a ``MetaTensor`` is accepted (its metadata dropped).
        inputs: (B, C, H, W) or (B, C, H, W, D) images the map belongs to.
        name: the map's name in error messages.

    Returns:
        The map as a plain floating tensor on ``inputs.device``.

    Raises:
        TypeError: not a tensor.
        ValueError: a shape other than (B, 1, *inputs.shape[2:]) (no broadcasting), NaN/infinite or
            negative values (the offending samples are named).
    """
    if not isinstance(target_map, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(target_map).__name__}.")
    target_map = target_map.as_subclass(torch.Tensor)
    expected = (inputs.shape[0], 1, *inputs.shape[2:])
    if tuple(target_map.shape) != expected:
        raise ValueError(
            f"{name} has shape {tuple(target_map.shape)} but the images {tuple(inputs.shape)} need {expected}: "
            "one single-channel map per image with the image's spatial shape (no broadcasting is done)."
        )
    if not target_map.is_floating_point():
        target_map = target_map.float()
    flat = target_map.detach().flatten(1)
    bad = ~torch.isfinite(flat).all(dim=1)
    if bad.any():
        raise ValueError(f"{name} contains NaN or infinite values (samples {bad.nonzero().flatten().tolist()}).")
    bad = (flat < 0).any(dim=1)
    if bad.any():
        raise ValueError(f"{name} must be non-negative; negative values in samples {bad.nonzero().flatten().tolist()}.")
    return target_map.to(inputs.device)


def check_inputs(inputs: torch.Tensor, name: str = "inputs") -> torch.Tensor:
    """Refuse images with NaN or infinite values, whose saliency loss can be finite while its gradients are NaN
    (a min-max normalized map hides the NaN from the loss value, not from the backward pass).

    Args:
        inputs: (B, C, H, W) or (B, C, H, W, D) images.
        name: the images' name in error messages (``"batch['image']"`` in a trainer).

    Returns:
        ``inputs``, unchanged.

    Raises:
        TypeError: not a tensor.
        ValueError: NaN or infinite values; the message names the samples.
    """
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(inputs).__name__}.")
    bad = ~torch.isfinite(inputs.detach().as_subclass(torch.Tensor).flatten(1)).all(dim=1)
    if bad.any():
        raise ValueError(
            f"{name} has NaN or infinite values (samples {bad.nonzero().flatten().tolist()}): its saliency "
            "loss would have NaN gradients."
        )
    return inputs


def _valid_samples(target_map: torch.Tensor) -> torch.Tensor:
    """(B,) True where the (B, 1, *spatial) map is not all zeros."""
    return target_map.detach().flatten(1).amax(dim=1) > 0


def _zero_like_graph(*tensors: torch.Tensor) -> torch.Tensor:
    """A scalar 0 connected to the graph of ``tensors`` (so ``backward`` works and gives zero gradients)."""
    total = None
    for tensor in tensors:
        if tensor.requires_grad:
            term = tensor.sum() * 0.0
            total = term if total is None else total + term
    if total is None:
        return tensors[0].new_zeros(())
    return total


def _masked_mean(per_sample: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of the (B,) values over the valid samples; 0 (with graph) when none is valid."""
    weights = valid.to(per_sample.dtype)
    return (per_sample * weights).sum() / weights.sum().clamp_min(1.0)


def _true_classes(targets: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """(B,) class indices from labels given as (B,), (B, 1) or one-hot (B, num_classes), checked against the
    logits (see :func:`monai_kdx.networks.class_indices`)."""
    return class_indices(targets, logits.shape[0], logits.shape[1], one_hot=True, device=logits.device)


def input_gradient_saliency(
    inputs: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, create_graph: bool = True
) -> torch.Tensor:
    """Input-gradient saliency ``Σ_channels |∂y_c/∂x|`` of each sample's class ``c``.

    Args:
        inputs: (B, C, H, W) or (B, C, H, W, D), ``requires_grad=True``, part of the graph of ``logits``.
        logits: (B, num_classes).
        targets: (B,) class indices.
        create_graph: keep the graph so a loss on the map trains the network (double backward).

    Returns:
        (B, 1, H, W) or (B, 1, H, W, D) non-negative map (not normalized).

    Raises:
        ValueError: ``inputs`` does not require grad (the forward did not start from a leaf).
    """
    if not inputs.requires_grad:
        raise ValueError(
            "inputs do not require grad: run the forward on inputs.detach().requires_grad_(True) "
            "(SaliencyLoss.context and SaliencyGuidance do this for losses with needs_input_grad)."
        )
    score = logits.gather(1, targets.view(-1, 1)).sum()
    (grad,) = torch.autograd.grad(score, inputs, create_graph=create_graph, retain_graph=True)
    return grad.abs().sum(dim=1, keepdim=True)


def _max_normalize(flat: torch.Tensor) -> torch.Tensor:
    peak = flat.amax(dim=1, keepdim=True)
    return torch.where(peak > 0, flat / peak.clamp_min(torch.finfo(flat.dtype).tiny), torch.zeros_like(flat))


def saliency_divergence(
    saliency: torch.Tensor, target_map: torch.Tensor, divergence: str = "kl", eps: float = SALIENCY_EPS
) -> torch.Tensor:
    """Per-sample loss between saliency maps and target maps (lower is better; see :data:`SALIENCY_DIVERGENCES`).

    Differentiable with respect to ``saliency``. Computed in float32 at least (safe under autocast).

    Args:
        saliency: (B, 1, H, W) or (B, 1, H, W, D) non-negative saliency.
        target_map: non-negative target of the same shape.
        divergence: ``"kl"``, ``"nss"``, ``"cc"``, ``"sim"`` or ``"mse"``.
        eps: regularization constant of ``"kl"``, a finite number > 0.

    Returns:
        (B,) losses; 0 for a sample with an all-zero target map.

    Raises:
        ValueError: an unknown divergence, ``eps`` not a finite number > 0, a shape mismatch, NaN or negative
            values.
    """
    if divergence not in SALIENCY_DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {SALIENCY_DIVERGENCES}.")
    eps = check_positive("eps", eps)
    if saliency.shape != target_map.shape:
        raise ValueError(
            f"shape mismatch: saliency {tuple(saliency.shape)} vs target_map {tuple(target_map.shape)} "
            "(no broadcasting is done)."
        )
    dtype = torch.promote_types(saliency.dtype, torch.float32)
    saliency, target_map = saliency.to(dtype), target_map.to(dtype)
    check_target_map(target_map, saliency, "target_map")
    if not torch.isfinite(saliency.detach()).all():
        raise ValueError("saliency contains NaN or infinite values.")
    valid = _valid_samples(target_map)
    if divergence == "kl":
        loss = saliency_kl(saliency, target_map, eps=eps)
    elif divergence == "cc":  # not the metric's Pearson: its sqrt has an infinite gradient at a constant map
        a = saliency.flatten(1) - saliency.flatten(1).mean(dim=1, keepdim=True)
        b = target_map.flatten(1) - target_map.flatten(1).mean(dim=1, keepdim=True)
        norms = a.pow(2).sum(dim=1) * b.pow(2).sum(dim=1)
        safe = torch.where(norms > 0, norms, torch.ones_like(norms)).sqrt()
        loss = 1.0 - torch.where(norms > 0, (a * b).sum(dim=1) / safe, torch.zeros_like(norms)).clamp(-1.0, 1.0)
    elif divergence == "sim":
        loss = 1.0 - saliency_sim(saliency, target_map)
    else:
        s, g = saliency.flatten(1), target_map.flatten(1)
        if divergence == "mse":
            loss = (_max_normalize(s) - _max_normalize(g)).pow(2).mean(dim=1)
        else:  # nss, weighted by the target density
            centered = s - s.mean(dim=1, keepdim=True)
            variance = centered.pow(2).mean(dim=1, keepdim=True)
            std = torch.where(variance > 0, variance, torch.ones_like(variance)).sqrt()  # finite gradient at 0
            z = torch.where(variance > 0, centered / std, torch.zeros_like(centered))
            loss = -(z * g).sum(dim=1) / g.sum(dim=1).clamp_min(torch.finfo(dtype).tiny)
    return torch.where(valid, loss, torch.zeros_like(loss))


class SaliencyLoss(nn.Module):
    """Base of the saliency losses: ``from_context(context)`` → scalar loss.

    Subclasses set ``layers`` (module paths whose outputs they need captured) and ``needs_input_grad``
    (whether the forward must start from an input that requires grad), and implement
    :meth:`_from_context`; the base validates the target map against the inputs first.
    """

    needs_input_grad: bool = False

    @property
    def layers(self) -> tuple[str, ...]:
        """Module paths whose outputs the loss reads from ``context.features``."""
        return ()

    def resolve_layers(self, network: nn.Module, example: torch.Tensor) -> None:
        """Pick layers left to choose automatically, from a probe forward on ``example`` (default: nothing)."""

    @property
    def needs_layer_resolution(self) -> bool:
        """True while a layer is still to be picked by :meth:`resolve_layers`."""
        return False

    def check_network(self, network: nn.Module) -> None:
        """Raise ValueError (listing close matches) when a layer path does not exist in ``network``."""
        FeatureCapture(network, list(self.layers))

    def from_context(self, context: SaliencyContext) -> torch.Tensor:
        """The loss of one batch.

        Args:
            context: see :class:`SaliencyContext`.

        Returns:
            Scalar tensor, differentiable with respect to the network's weights.

        Raises:
            ValueError: NaN or infinite inputs (see :func:`check_inputs`), a bad target map (see
                :func:`check_target_map`), or a needed feature not captured.
        """
        check_inputs(context.inputs)
        target_map = check_target_map(context.target_map, context.inputs)
        missing = [path for path in self.layers if path not in context.features]
        if missing:
            raise ValueError(
                f"{type(self).__name__} needs the features of {missing}; captured: {list(context.features)}."
            )
        targets = _true_classes(context.targets, context.logits)
        context = SaliencyContext(
            context.network, context.inputs, context.logits, context.features, targets, target_map
        )
        return self._from_context(context)

    def _from_context(self, context: SaliencyContext) -> torch.Tensor:
        raise NotImplementedError

    def context(
        self, network: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, target_map: torch.Tensor
    ) -> SaliencyContext:
        """Run ``network`` on ``inputs`` capturing what this loss needs, for a plain training loop.

        Example:
            >>> context = loss.context(net, images, labels, gaze)   # (B,1,H,W[,D]) images and gaze
            >>> total = F.cross_entropy(context.logits, labels) + loss.from_context(context)
            >>> total.backward()

        Args:
            network: the model, in the mode you train it in.
            inputs: (B, C, H, W) or (B, C, H, W, D).
            targets: (B,) true classes.
            target_map: (B, 1, H, W) or (B, 1, H, W, D).

        Returns:
            The :class:`SaliencyContext` (logits with graph: use them for the task loss too).

        Raises:
            ValueError: NaN or infinite inputs, a bad target map (both checked before the forward).
        """
        check_inputs(inputs)
        check_target_map(target_map, inputs)
        if self.needs_layer_resolution:
            self.resolve_layers(network, inputs)
        if self.needs_input_grad:
            inputs = inputs.detach().requires_grad_(True)
        with torch.enable_grad(), FeatureCapture(network, list(self.layers)) as capture:
            logits = network(inputs)
        features = {path: capture[path] for path in self.layers}
        return SaliencyContext(network, inputs, logits, features, targets, target_map)


@SALIENCY_LOSSES.register("alignment")
class SaliencyAlignmentLoss(SaliencyLoss):
    """Align the model's saliency for the true class with a target map (eye-gaze heatmap or lesion mask).

    The saliency is a CAM at ``layer`` from the shared CAM core (:func:`monai_kdx.explain.cam_from_features`
    with ``create_graph=True``, upsampled to the target map's size, min-max normalized per sample) or, with
    ``method="input_gradient"``, ``Σ_channels |∂y_c/∂x|`` (min-max normalized); it is compared with the
    target by ``divergence`` (see :data:`SALIENCY_DIVERGENCES`). Samples with an all-zero target map
    contribute nothing; the loss is ``weight`` times the mean over the others.

    Two forms:
        ``forward(saliency, target_map)``: the divergence of given (B, 1, H, W[, D]) maps;
        ``from_context(context)``: computes the saliency from a training forward (see :class:`SaliencyContext`).

    Args:
        layer: module path of the CAM layer (e.g. ``"blocks.2"`` of :class:`~monai_kdx.networks.ShallowCNN`,
            ``"features.denseblock3"`` of a MONAI DenseNet), or several paths whose CAMs are fused (the mean of the
            min-max normalized levels, as :class:`~monai_kdx.explain.HierarchicalCAM` fuses them); ``None`` with a
            CAM method picks the deepest stage on first use, ``"stages"`` every stage (see
            :func:`monai_kdx.explain.stage_layers`): the hierarchical explanation itself is guided. Ignored by
            ``"input_gradient"``.
        method: one of :data:`SALIENCY_METHODS`: ``"gradcam"``, ``"gradcam++"``, ``"layercam"``,
            ``"activation"``, ``"input_gradient"`` or ``"lrp"``.
        divergence: one of :data:`SALIENCY_DIVERGENCES`.
        weight: factor on the loss, finite and >= 0.
        eps: regularization constant of the KL divergence, finite and > 0.
        lrp_composite: the zennit composite of ``method="lrp"`` (see :class:`monai_kdx.explain.LRPAttribution`).
            LRP runs its own forward pass (in eval mode, BatchNorms passing relevance through) and its rules use
            detached copies of the modified weights, so the gradient reaches the weights through the
            activations and the target logit: a training signal, not the exact derivative.

    Raises:
        ValueError: unknown method or divergence, a negative, NaN or infinite weight, ``eps`` not a finite number > 0.

    Example:
        >>> loss = SaliencyAlignmentLoss("blocks.2", method="gradcam", divergence="kl")
        >>> context = loss.context(net, images, labels, gaze)       # (B,1,64,64,64), (B,), (B,1,64,64,64)
        >>> (F.cross_entropy(context.logits, labels) + loss.from_context(context)).backward()
    """

    def __init__(
        self,
        layer: str | Sequence[str] | None = None,
        method: str = "gradcam",
        divergence: str = "kl",
        weight: float = 1.0,
        eps: float = SALIENCY_EPS,
        lrp_composite: str = "epsilon_plus_flat",
    ) -> None:
        super().__init__()
        if method not in SALIENCY_METHODS:
            raise ValueError(f"unknown saliency method {method!r}; choose one of {SALIENCY_METHODS}.")
        if divergence not in SALIENCY_DIVERGENCES:
            raise ValueError(f"unknown divergence {divergence!r}; choose one of {SALIENCY_DIVERGENCES}.")
        if isinstance(layer, Sequence) and not isinstance(layer, str):
            layer = list(layer)
            if not layer or not all(isinstance(path, str) and path for path in layer):
                raise ValueError(f"layer must hold module paths (non-empty strings), got {layer!r}.")
        elif layer is not None and (not isinstance(layer, str) or not layer):
            raise ValueError(f"layer must be a module path, a list of them, 'stages' or None, got {layer!r}.")
        self.layer = layer
        self.method = method
        self.divergence = divergence
        self.weight = check_weight("weight", weight)
        self.eps = check_positive("eps", eps)
        self.needs_input_grad = method == "input_gradient"
        self.lrp_composite = lrp_composite
        if method == "lrp":
            from monai_kdx.explain.attribution import LRP_COMPOSITES

            if lrp_composite not in LRP_COMPOSITES:
                raise ValueError(f"unknown LRP composite {lrp_composite!r}; valid composites: {list(LRP_COMPOSITES)}.")

    @property
    def _uses_layer(self) -> bool:
        return self.method in CAM_MODES

    @property
    def layers(self) -> tuple[str, ...]:
        if not self._uses_layer or self.needs_layer_resolution:
            return ()
        return tuple(self.layer) if isinstance(self.layer, list) else (self.layer,)

    @property
    def needs_layer_resolution(self) -> bool:
        return self._uses_layer and self.layer in (None, "stages")

    def resolve_layers(self, network: nn.Module, example: torch.Tensor) -> None:
        """Pick the deepest usable convolution stage of ``network`` (``layer=None``) or every one
        (``layer="stages"``), from one probe forward."""
        if self.needs_layer_resolution:
            stages = stage_layers(network, example)
            self.layer = stages[-1] if self.layer is None else list(stages)

    def forward(self, saliency: torch.Tensor, target_map: torch.Tensor) -> torch.Tensor:
        """Weighted divergence of (B, 1, H, W[, D]) saliency maps from target maps of the same shape,
        averaged over the samples whose target map is not all zeros (0 when there is none)."""
        target_map = check_target_map(target_map, saliency)
        valid = _valid_samples(target_map)
        if not valid.any():
            return _zero_like_graph(saliency)
        per_sample = saliency_divergence(saliency, target_map, self.divergence, self.eps)
        return self.weight * _masked_mean(per_sample, valid)

    def saliency(self, context: SaliencyContext, size: Sequence[int] | None = None) -> torch.Tensor:
        """The differentiable, min-max normalized (B, 1, *size) saliency of each sample's ``context.targets``."""
        size = tuple(size) if size is not None else tuple(context.inputs.shape[2:])
        targets = _true_classes(context.targets, context.logits)
        with torch.enable_grad():
            if self.method in ("input_gradient", "lrp"):
                if self.method == "lrp":
                    from monai_kdx.explain.attribution import LRPAttribution
                    from monai_kdx.networks import unwrap_network

                    explainer = LRPAttribution(
                        unwrap_network(context.network), composite=self.lrp_composite, create_graph=True
                    )
                    raw = explainer.attribute(context.inputs, targets).clamp_min(0)
                else:
                    raw = input_gradient_saliency(context.inputs, context.logits, targets, create_graph=True)
                if tuple(raw.shape[2:]) != size:
                    raw = F.interpolate(raw, size=size, mode="bilinear" if raw.ndim == 4 else "trilinear")
                return minmax_normalize(raw)
            maps = cam_from_features(
                {path: context.features[path] for path in self.layers},
                context.logits,
                targets,
                mode=self.method,
                size=size,
                normalize=True,
                create_graph=True,
            )
        return maps[self.layers[0]] if len(maps) == 1 else fuse_maps(list(maps.values()), "mean")

    def _from_context(self, context: SaliencyContext) -> torch.Tensor:
        valid = _valid_samples(context.target_map)
        if not valid.any():  # nothing to align: skip the backward through the features
            return _zero_like_graph(context.logits)
        saliency = self.saliency(context, context.target_map.shape[2:])
        per_sample = saliency_divergence(saliency, context.target_map, self.divergence, self.eps)
        return self.weight * _masked_mean(per_sample, valid)


@SALIENCY_LOSSES.register("rrr")
class RightForTheRightReasonsLoss(SaliencyLoss):
    """Right for the Right Reasons (Ross et al. 2017): penalize input gradients where the input should
    not matter.

    ``weight · Σ_{c, voxels} (A ⊙ ∂(Σ_k log softmax(z)_k)/∂x)²`` per sample (summed over the input's
    channels and positions, as in the paper), averaged over the samples with a non-empty target map.
    ``A`` is built from the target map ``M`` (scaled to a maximum of 1 per sample): with
    ``map_marks="relevant"`` (gaze, lesion masks: where the input SHOULD matter) ``A = 1 − M``; with
    ``map_marks="irrelevant"`` (an annotation of confounders) ``A = M``. ``A`` (B, 1, *spatial) applies
    to every input channel.

    Args:
        weight: λ, the factor on the penalty, finite and >= 0 (the paper's values are large, e.g. 10 to 1000,
            for small inputs; the sum grows with the number of voxels).
        map_marks: ``"relevant"`` or ``"irrelevant"``: what the target map marks.

    Raises:
        ValueError: a negative, NaN or infinite weight or an unknown ``map_marks``.
    """

    needs_input_grad = True

    def __init__(self, weight: float = 1.0, map_marks: str = "relevant") -> None:
        super().__init__()
        if map_marks not in ("relevant", "irrelevant"):
            raise ValueError(f"map_marks must be 'relevant' or 'irrelevant', got {map_marks!r}.")
        self.weight = check_weight("weight", weight)
        self.map_marks = map_marks

    def _from_context(self, context: SaliencyContext) -> torch.Tensor:
        valid = _valid_samples(context.target_map)
        if not valid.any():
            return _zero_like_graph(context.logits)
        if not context.inputs.requires_grad:
            raise ValueError("RightForTheRightReasonsLoss needs inputs that require grad (see SaliencyLoss.context).")
        with torch.enable_grad():
            log_probabilities = F.log_softmax(float32_or_wider(context.logits), dim=1).sum()
            (grad,) = torch.autograd.grad(log_probabilities, context.inputs, create_graph=True, retain_graph=True)
        flat = context.target_map.flatten(1)
        scaled = _max_normalize(flat).view_as(context.target_map)
        mask = 1.0 - scaled if self.map_marks == "relevant" else scaled
        per_sample = (mask * float32_or_wider(grad)).pow(2).flatten(1).sum(dim=1)
        return self.weight * _masked_mean(per_sample, valid)


@SALIENCY_LOSSES.register("gain")
class GAINLoss(SaliencyLoss):
    """GAIN (Li et al. 2018, "Tell me where to look"): attention mining plus pixel supervision.

    ``A``: the Grad-CAM (or ``method``) of the true class at ``layer``, differentiable, upsampled to the
    input and min-max normalized; ``T(A) = sigmoid(ω·(A − σ))`` a soft mask; ``x* = x − T(A) ⊙ x`` the
    image with the attended region erased.

    - attention mining: the softmax probability of the true class on ``x*`` (one extra forward of the
      unwrapped network; minimizing it makes the attention cover all the evidence);
    - pixel supervision: mean over positions of ``(A − H)²``, ``H`` the target map scaled to a maximum of 1.

    Loss: ``mining_weight · mining + pixel_weight · pixel``, each averaged over the samples with a
    non-empty target map (samples without an annotation, e.g. the normal class, contribute to neither
    term, as GAIN mines only positive samples). The extra forward runs in the network's current mode
    (BatchNorm running statistics see the erased images too, as in GAIN).

    Args:
        layer: module path of the CAM layer.
        mining_weight: α, weight of the attention-mining term, finite and >= 0.
        pixel_weight: weight of the pixel-supervision term, finite and >= 0.
        sigma: threshold σ of the soft mask, in [0, 1] (the CAM's range).
        omega: sharpness ω of the soft mask, finite and > 0.
        method: a CAM mode (default ``"gradcam"``).

    Raises:
        ValueError: an empty layer, an unknown CAM mode, negative, NaN or infinite weights, ``sigma`` outside
            [0, 1], ``omega`` not a finite number > 0.
    """

    def __init__(
        self,
        layer: str,
        mining_weight: float = 1.0,
        pixel_weight: float = 1.0,
        sigma: float = 0.5,
        omega: float = 10.0,
        method: str = "gradcam",
    ) -> None:
        super().__init__()
        if not isinstance(layer, str) or not layer:
            raise ValueError(f"layer must be a module path (a non-empty string), got {layer!r}.")
        if method not in CAM_MODES:
            raise ValueError(f"unknown CAM mode {method!r}; choose one of {CAM_MODES}.")
        self.layer = layer
        self.mining_weight = check_weight("mining_weight", mining_weight)
        self.pixel_weight = check_weight("pixel_weight", pixel_weight)
        self.sigma = check_weight("sigma", sigma)
        if self.sigma > 1.0:
            raise ValueError(f"sigma must be in [0, 1] (the CAM's range), got {sigma!r}.")
        self.omega = check_positive("omega", omega)
        self.method = method

    @property
    def layers(self) -> tuple[str, ...]:
        return (self.layer,)

    def parts(self, context: SaliencyContext) -> dict[str, torch.Tensor]:
        """The two terms, unweighted: ``{"mining": ..., "pixel": ...}`` (scalars)."""
        from monai_kdx.networks import unwrap_network

        check_inputs(context.inputs)
        target_map = check_target_map(context.target_map, context.inputs)
        valid = _valid_samples(target_map)
        if not valid.any():
            zero = _zero_like_graph(context.logits)
            return {"mining": zero, "pixel": zero}
        targets = _true_classes(context.targets, context.logits)
        with torch.enable_grad():
            cam = cam_from_features(
                {self.layer: context.features[self.layer]},
                context.logits,
                targets,
                mode=self.method,
                size=context.inputs.shape[2:],
                normalize=True,
                create_graph=True,
            )[self.layer]
            soft_mask = torch.sigmoid(self.omega * (cam - self.sigma))
            index = valid.nonzero().flatten()
            inputs = context.inputs[index]
            erased = inputs - soft_mask[index].to(inputs.dtype) * inputs
            erased_logits = unwrap_network(context.network)(erased)
        probability = F.softmax(float32_or_wider(erased_logits), dim=1).gather(1, targets[index].view(-1, 1)).mean()
        reference = _max_normalize(target_map.flatten(1)).view_as(target_map)
        pixel = (float32_or_wider(cam) - reference).pow(2).flatten(1).mean(dim=1)
        return {"mining": probability, "pixel": _masked_mean(pixel, valid)}

    def _from_context(self, context: SaliencyContext) -> torch.Tensor:
        parts = self.parts(context)
        return self.mining_weight * parts["mining"] + self.pixel_weight * parts["pixel"]
