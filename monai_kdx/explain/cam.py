"""The CAM core: class activation maps at several layers from ONE forward and ONE backward pass.

Everything that needs a CAM uses this module: :class:`HierarchicalCAM` (explanations and their
transforms), the explanation-distillation and saliency losses (through :func:`cam_from_features` on
features captured during their own training forward, with ``create_graph=True``) and the pruning
transparency gate.

Modes (``A_k``: channel ``k`` of a layer's feature map, ``g_k = ∂y_c/∂A_k``, sums over all
spatial positions, so 2D and 3D are the same code):

- ``"gradcam"``: ``relu(Σ_k mean(g_k) · A_k)`` (Selvaraju et al.).
- ``"gradcam++"``: ``relu(Σ_k w_k · A_k)`` with ``w_k = Σ α_k · relu(g_k)``,
  ``α_k = g_k² / (2·g_k² + Σ(A_k) · g_k³)`` where the gradient is not zero (Chattopadhay et al.,
  eq. 19; the exponent-free form holds for any number of spatial dimensions).
- ``"layercam"``: ``relu(Σ_k relu(g_k) ⊙ A_k)`` (Jiang et al.).
- ``"activation"``: ``mean_k A_k``, the plain channel-mean map (forward only, no backward).

Unlike MONAI's ``GradCAM``, nothing here calls ``zero_grad`` (gradients are taken with
``torch.autograd.grad`` with respect to the captured feature maps only, so no parameter gradient
is computed or touched), nothing is detached when ``create_graph=True``, no hook outlives a call,
per-sample classes never mix across the batch, and a constant map normalizes to zeros.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from monai_kdx.networks import FeatureCapture, Target, resolve_targets, restore_mode, trace_network
from monai_kdx.registry import EXPLAINERS

from .activation import minmax_normalize
from .base import Explainer, check_inputs, check_target_range

__all__ = ["CAM_MODES", "FUSIONS", "CAMResult", "HierarchicalCAM", "cam_from_features", "stage_layers", "fuse_maps"]

CAM_MODES = ("gradcam", "gradcam++", "layercam", "activation")
FUSIONS = ("mean", "max", "product")


def _channel_weighted_map(activation: torch.Tensor, grad: torch.Tensor | None, mode: str) -> torch.Tensor:
    """One layer's CAM at its own resolution.

    Args:
        activation: (B, K, *spatial) feature map.
        grad: (B, K, *spatial) gradient of the target scores with respect to it (None for "activation").
        mode: one of :data:`CAM_MODES`.

    Returns:
        (B, 1, *spatial) map (not normalized).
    """
    if mode == "activation":
        return activation.mean(dim=1, keepdim=True)
    spatial = tuple(range(2, activation.ndim))
    if mode == "gradcam":
        weights = grad.mean(dim=spatial, keepdim=True)
        return F.relu((weights * activation).sum(dim=1, keepdim=True))
    if mode == "gradcam++":
        grad2, grad3 = grad.pow(2), grad.pow(3)
        denominator = 2 * grad2 + activation.sum(dim=spatial, keepdim=True) * grad3
        safe = torch.where(denominator != 0, denominator, torch.ones_like(denominator))
        alpha = torch.where(denominator != 0, grad2 / safe, torch.zeros_like(grad2))
        weights = (alpha * F.relu(grad)).sum(dim=spatial, keepdim=True)
        return F.relu((weights * activation).sum(dim=1, keepdim=True))
    if mode == "layercam":
        return F.relu((F.relu(grad) * activation).sum(dim=1, keepdim=True))
    raise ValueError(f"unknown CAM mode {mode!r}; choose one of {CAM_MODES}.")


def fuse_maps(maps: Sequence[torch.Tensor], fusion: str = "mean") -> torch.Tensor:
    """Fuse same-sized (B, 1, *spatial) maps (each in [0, 1]) into one normalized map.

    ``"mean"`` averages the levels, ``"max"`` keeps the strongest, ``"product"`` keeps only what every
    level agrees on (geometric mean).
    """
    stacked = torch.stack(list(maps), dim=0)
    if fusion == "mean":
        fused = stacked.mean(dim=0)
    elif fusion == "max":
        fused = stacked.max(dim=0).values
    elif fusion == "product":
        fused = stacked.clamp_min(0).prod(dim=0).pow(1.0 / len(maps))
    else:
        raise ValueError(f"unknown fusion {fusion!r}; choose one of {FUSIONS}.")
    return minmax_normalize(fused)


def cam_from_features(
    features: Mapping[str, torch.Tensor],
    logits: torch.Tensor,
    targets: torch.Tensor,
    mode: str = "gradcam",
    size: Sequence[int] | None = None,
    normalize: bool = True,
    create_graph: bool = False,
) -> dict[str, torch.Tensor]:
    """CAMs of several layers from features captured during one forward pass, with ONE backward.

    The backward pass runs from the target scores to the captured feature maps only (it stops at the
    shallowest of them and computes no parameter gradient).

    Args:
        features: layer path → (B, K, *spatial) feature map, part of the graph that produced ``logits``.
        logits: (B, num_classes) output of the same forward pass.
        targets: (B,) class index per sample.
        mode: one of :data:`CAM_MODES`.
        size: spatial size to upsample every map to (bilinear in 2D, trilinear in 3D); None keeps each
            layer's own resolution.
        normalize: min-max normalize each map per sample to [0, 1] (a constant map becomes zeros).
        create_graph: keep the graph of the maps so a loss on them trains the network (second-order
            gradients through the feature maps and the weights).

    Returns:
        Layer path → (B, 1, *size) map, in the order of ``features``.

    Raises:
        ValueError: an unknown mode, a captured feature that is not a (B, K, *spatial) tensor, or (with
            ``create_graph``) a feature map of one position, whose CAM is constant and gives a loss no gradient.
    """
    if mode not in CAM_MODES:
        raise ValueError(f"unknown CAM mode {mode!r}; choose one of {CAM_MODES}.")
    paths = list(features)
    for path in paths:
        value = features[path]
        if not isinstance(value, torch.Tensor) or value.ndim < 3 or value.shape[0] != logits.shape[0]:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"layer {path!r} gives {shape}, not a (B, K, *spatial) feature map; choose a conv stage.")
        if create_graph and value[0, 0].numel() == 1:
            raise ValueError(
                f"layer {path!r} gives a {tuple(value.shape[2:])} map for this input: one position, so its CAM is "
                "constant and a loss on it has no gradient; choose a shallower layer (at least 2 positions per axis)."
            )
    grads: Sequence[torch.Tensor | None] = [None] * len(paths)
    if mode != "activation":
        score = logits.gather(1, targets.view(-1, 1).to(logits.device)).sum()
        grads = torch.autograd.grad(
            score, [features[p] for p in paths], create_graph=create_graph, retain_graph=create_graph
        )
    maps = {}
    for path, grad in zip(paths, grads, strict=True):
        activation = features[path] if create_graph else features[path].detach()
        cam = _channel_weighted_map(activation, grad, mode)
        if size is not None and tuple(cam.shape[2:]) != tuple(size):
            cam = F.interpolate(cam, size=tuple(size), mode="bilinear" if cam.ndim == 4 else "trilinear")
        maps[path] = minmax_normalize(cam) if normalize else cam
    return maps


def stage_layers(network: nn.Module, example: torch.Tensor) -> list[str]:
    """One layer per stage of a CNN, shallow to deep, from one probe forward pass (see
    :meth:`monai_kdx.networks.NetworkTrace.stage_layers`). MONAI DenseNet121 gives ``features.denseblock1`` …
    ``features.denseblock4``; MONAI ResNet ``layer1`` … ``layer4``; a DDP wrapper adds ``module.``.

    Args:
        network: a 2D or 3D CNN classifier.
        example: (B, C, *spatial) input; only its first sample is run (eval mode).

    Raises:
        ValueError: the network has no convolution stages.
    """
    return trace_network(network, example).stage_layers()


@dataclass
class CAMResult(Mapping):
    """Maps of one :meth:`HierarchicalCAM.cam` call: a read-only mapping layer path → (B, 1, *spatial)
    map (shallow to deep), plus the fused map, the logits and the explained class of each sample."""

    levels: dict[str, torch.Tensor]
    fused: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor = field(repr=False)

    def __getitem__(self, path: str) -> torch.Tensor:
        return self.levels[path]

    def __iter__(self) -> Iterator[str]:
        return iter(self.levels)

    def __len__(self) -> int:
        return len(self.levels)


class HierarchicalCAM(Explainer):
    """Multi-level class activation maps of a 2D or 3D CNN from one forward and one backward pass.

    Args:
        network: a classifier returning (B, num_classes) logits.
        layers: module paths to explain; ``None`` picks one layer per stage on the first call
            (see :func:`stage_layers`).
        mode: ``"gradcam"``, ``"gradcam++"``, ``"layercam"`` or ``"activation"`` (see module docs).
        fusion: how levels are fused: ``"mean"``, ``"max"`` or ``"product"``.
        normalize: min-max normalize every level per sample (the fused map is always normalized).

    Raises:
        ValueError: an unknown mode or fusion, or a layer path that does not exist (valid paths listed).

    Example:
        >>> cam = HierarchicalCAM(densenet, mode="gradcam++")
        >>> result = cam.cam(volume)                 # volume: (B, 1, 96, 96, 96)
        >>> list(result)                             # ['features.denseblock1', ..., 'features.denseblock4']
        >>> result["features.denseblock2"].shape     # (B, 1, 96, 96, 96)
        >>> result.fused.shape                       # (B, 1, 96, 96, 96)
    """

    def __init__(
        self,
        network: nn.Module,
        layers: Sequence[str] | str | None = None,
        mode: str = "gradcam",
        fusion: str = "mean",
        normalize: bool = True,
    ) -> None:
        super().__init__(network)
        if mode not in CAM_MODES:
            raise ValueError(f"unknown CAM mode {mode!r}; choose one of {CAM_MODES}.")
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; choose one of {FUSIONS}.")
        self.mode, self.fusion, self.normalize = mode, fusion, normalize
        self._capture: FeatureCapture | None = None
        if layers is not None:
            self._capture = FeatureCapture(network, layers)  # resolves (and checks) every path now
            if not self._capture.layers:
                raise ValueError("layers is empty; pass None to pick one layer per stage.")

    @property
    def layers(self) -> list[str] | None:
        """The explained module paths (None until the first call when picked automatically)."""
        return None if self._capture is None else list(self._capture.layers)

    def cam(self, inputs: torch.Tensor, class_idx: Target = None, create_graph: bool = False) -> CAMResult:
        """Explain ``inputs`` at every layer.

        Args:
            inputs: (B, C, H, W) or (B, C, H, W, D).
            class_idx: ``None`` (each sample's own predicted class), an int, or a (B,) tensor of ints.
            create_graph: keep the graph so the maps can be used in a loss (gradients reach the weights).

        Returns:
            :class:`CAMResult`: layer path → (B, 1, H, W[, D]) maps, ``fused``, ``logits``, ``targets``.

        Raises:
            ValueError: NaN input, a spatial dimensionality the network does not use, or a class index
                out of range; raised before any forward pass.
        """
        check_inputs(self.network, inputs)
        check_target_range(self.network, class_idx, inputs.shape[0])
        if self._capture is None:
            self._capture = FeatureCapture(self.network, stage_layers(self.network, inputs))
        needs_leaf = self.mode != "activation" and not inputs.requires_grad
        needs_leaf = needs_leaf and not any(p.requires_grad for p in self.network.parameters())
        if needs_leaf:  # a frozen network: the graph must start somewhere
            inputs = inputs.detach().requires_grad_(True)
        with torch.enable_grad(), restore_mode(self.network, training=False), self._capture as features:
            logits = self.network(inputs)
            targets = resolve_targets(class_idx, logits)
            levels = cam_from_features(
                {path: features[path] for path in self._capture.layers},
                logits,
                targets,
                mode=self.mode,
                size=inputs.shape[2:],
                normalize=self.normalize,
                create_graph=create_graph,
            )
        fused = fuse_maps([minmax_normalize(m) for m in levels.values()], self.fusion)
        if not create_graph:
            logits = logits.detach()
        return CAMResult(levels=levels, fused=fused, logits=logits, targets=targets)

    def _attribute(self, inputs: torch.Tensor, target: Target) -> torch.Tensor:
        return self.cam(inputs, target).fused


for _mode in CAM_MODES:
    EXPLAINERS.register(_mode, functools.partial(HierarchicalCAM, mode=_mode))
