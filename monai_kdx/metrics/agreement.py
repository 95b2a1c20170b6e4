"""Agreement between explanations: of two models on the same inputs (teacher, student, pruned model), and of
one model before and after its parameters are randomized (the model-parameter-randomization sanity check of
Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018).

Maps are (B, 1, H, W) in 2D or (B, 1, H, W, D) in 3D; agreements are (B,).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from monai_kdx.networks import float32_or_wider, resolve_module, unwrap_network

from ._common import (
    average_ranks,
    check_map,
    check_pair,
    descending_ranks,
    flatten_samples,
    is_constant,
    pearson,
)

__all__ = [
    "AGREEMENT_METHODS",
    "explanation_agreement",
    "randomizable_layers",
    "RandomizationResult",
    "randomization_sanity_check",
]

AGREEMENT_METHODS = ("cc", "rank", "iou_top")


def _spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of the rows of two (B, N) tensors (ties share their average rank)."""
    return pearson(average_ranks(a), average_ranks(b))


def explanation_agreement(map_a: Any, map_b: Any, method: str = "cc", top_fraction: float = 0.1) -> torch.Tensor:
    """Per-sample agreement of two explanation maps of the same inputs (e.g. teacher vs student).

    Methods:
        * ``"cc"``: Pearson correlation, in [-1, 1].
        * ``"rank"``: Spearman rank correlation, in [-1, 1]; tied values share their average rank.
        * ``"iou_top"``: intersection over union of the two top regions, each the ``k = ceil(top_fraction * N)``
          (at least 1) most relevant of the N positions (ties: lower flat index first), in [0, 1]; 0 when either
          map is constant (e.g. all zeros): such a map has no top region to agree on.

    Args:
        map_a: (B, 1, H, W) or (B, 1, H, W, D), any real values and floating dtype (computed in float32 at least).
        map_b: same shape.
        method: one of :data:`AGREEMENT_METHODS`.
        top_fraction: fraction of positions in the top region for ``"iou_top"``, in (0, 1].

    Returns:
        (B,) agreements in float32 (float64 for float64 maps); every method gives 0 when either map is constant.

    Raises:
        TypeError: a non-tensor input.
        ValueError: unknown ``method``, ``top_fraction`` outside (0, 1], wrong shape or ndim, shape mismatch,
            NaN/inf values.
    """
    if method not in AGREEMENT_METHODS:
        raise ValueError(f"method must be one of {AGREEMENT_METHODS}, got {method!r}.")
    if not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction!r}.")
    map_a, map_b = check_pair(map_a, map_b, "map_a", "map_b")
    a, b = flatten_samples(map_a), flatten_samples(map_b)
    if method == "cc":
        return pearson(a, b)
    if method == "rank":
        return _spearman(a, b)
    k = max(1, math.ceil(round(top_fraction * a.shape[1], 6)))
    top_a, top_b = descending_ranks(a) < k, descending_ranks(b) < k
    iou = (top_a & top_b).sum(dim=1).to(a.dtype) / (top_a | top_b).sum(dim=1)
    return torch.where(is_constant(a) | is_constant(b), torch.zeros_like(iou), iou)


def randomizable_layers(network: nn.Module) -> list[str]:
    """Module paths of the layers the sanity check randomizes by default, output end first.

    These are the modules that own parameters and have ``reset_parameters`` (convolutions, linear and
    normalization layers), in reverse definition order (for sequential models, from the last layer down).
    """
    return [
        name
        for name, module in unwrap_network(network).named_modules()
        if name and hasattr(module, "reset_parameters") and next(module.parameters(recurse=False), None) is not None
    ][::-1]


def _reinitialize(module: nn.Module) -> None:
    """Re-initialize a module and its submodules: ``reset_parameters()`` where available, else a truncated
    normal (std 0.02) for the parameters the module owns."""
    for submodule in module.modules():
        if callable(getattr(submodule, "reset_parameters", None)):
            submodule.reset_parameters()
        else:
            for parameter in submodule.parameters(recurse=False):
                nn.init.trunc_normal_(parameter, std=0.02)


@dataclass
class RandomizationResult:
    """Outcome of :func:`randomization_sanity_check`.

    Attributes:
        layers: module paths in the order they were randomized (cumulatively, output end first).
        similarity: for each path, (B,) Spearman rank correlations between the original map and the map of the
            network whose parameters are randomized from the top down to and including that layer.
        original: the maps of the trained network, (B, 1, H, W) or (B, 1, H, W, D), in float32 at least (maps
            returned in float16 or bfloat16 are converted before ranking).
    """

    layers: list[str]
    similarity: dict[str, torch.Tensor] = field(repr=False)
    original: torch.Tensor = field(repr=False)

    @property
    def final_similarity(self) -> float:
        """Mean similarity after the full cascade; a method that passes the check has a low value."""
        return float(self.similarity[self.layers[-1]].mean())


def randomization_sanity_check(
    network: nn.Module,
    explain_fn: Callable[[nn.Module, torch.Tensor, Any], torch.Tensor],
    image: torch.Tensor,
    target: Any,
    layers: Sequence[str] | None = None,
    seed: int = 0,
) -> RandomizationResult:
    """Cascading model-parameter randomization test of an explanation method (Adebayo et al. 2018).

    A deep copy of the network (the user's model is never touched) explains ``image``; then its layers are
    re-initialized one at a time from the output end down, cumulatively, and after each the explanation is
    recomputed and compared with the original by Spearman rank correlation per sample. An explanation that
    depends on the learned parameters loses its similarity as more layers are randomized; one that stays
    similar (e.g. an edge detector of the input) fails the check. Compare absolute maps by making
    ``explain_fn`` return them.

    Re-initialization uses ``reset_parameters()`` where a module has it (a normalization layer becomes the
    identity with fresh running statistics), else a truncated normal (std 0.02). It runs under ``seed`` in a
    forked RNG, so the global random state is unchanged. The copies keep the network's train/eval modes;
    ``explain_fn`` is called as is (with gradients enabled).

    Args:
        network: the trained model (a DDP/DataParallel wrapper is unwrapped).
        explain_fn: ``explain_fn(net, image, target)`` returning (B, 1, *image spatial) maps.
        image: (B, C, H, W) or (B, C, H, W, D).
        target: passed to ``explain_fn`` unchanged.
        layers: module paths to randomize in this order; ``None`` uses :func:`randomizable_layers`.
        seed: seed of the re-initialization.

    Returns:
        :class:`RandomizationResult` with a (B,) similarity per layer and the final mean similarity.

    Raises:
        ValueError: no layers, an unknown layer path (with close matches), a bad image, or ``explain_fn``
            returning something other than finite maps of shape (B, 1, *image spatial).
    """
    image = check_map(image, "image", single_channel=False)
    layers = randomizable_layers(network) if layers is None else list(layers)
    if not layers:
        raise ValueError(f"{type(unwrap_network(network)).__name__} has no layers with parameters to randomize.")
    for path in layers:
        resolve_module(network, path)
    expected = (image.shape[0], 1, *image.shape[2:])

    def explain(model: nn.Module) -> torch.Tensor:
        maps = float32_or_wider(check_map(explain_fn(model, image, target), "explain_fn output").detach())
        if maps.shape != expected:
            raise ValueError(f"explain_fn must return maps of shape {expected}, got {tuple(maps.shape)}.")
        return flatten_samples(maps)

    model = copy.deepcopy(unwrap_network(network))
    original = explain(model)
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    similarity = {}
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for path in layers:
            _reinitialize(resolve_module(model, path))
            similarity[path] = _spearman(original, explain(model))
    return RandomizationResult(layers=layers, similarity=similarity, original=original.view(expected))
