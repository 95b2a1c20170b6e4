"""Faithfulness of an attribution map: deletion and insertion curves (Petsiuk et al., "RISE: randomized input
sampling for explanation of black-box models", BMVC 2018).

Deletion replaces the most relevant pixels/voxels first with a baseline and watches the class probability
fall (a faithful map gives a low area); insertion starts from the baseline and restores the most relevant
positions first (a faithful map gives a high area). All perturbation steps of all samples are evaluated in
chunks under ``torch.no_grad()`` with the network in eval mode; each module's mode is restored afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ._common import check_map, descending_ranks, eval_mode, flatten_samples

__all__ = ["perturbation_curve", "deletion_auc", "insertion_auc"]

_MODES = ("deletion", "insertion")


def _check_target(target: int | Sequence[int] | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """(B,) int64 class indices from an int or a per-sample sequence; negative indices are rejected."""
    target = torch.as_tensor(target, device=device)
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}.")
    if target.ndim == 0:
        target = target.expand(batch)
    if target.shape != (batch,):
        raise ValueError(f"target must be an int or have shape ({batch},), got {tuple(target.shape)}.")
    if (target < 0).any():
        raise ValueError(f"target class indices must be >= 0, got {target.tolist()}.")
    return target.long()


def _check_baseline(baseline: float | torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """The baseline expanded to the image's shape (B, C, *spatial)."""
    baseline = torch.as_tensor(baseline, dtype=image.dtype, device=image.device)
    try:
        shape = torch.broadcast_shapes(baseline.shape, image.shape)
    except RuntimeError:
        shape = None
    if shape != image.shape:
        raise ValueError(
            f"baseline of shape {tuple(baseline.shape)} does not broadcast to the image shape {tuple(image.shape)}."
        )
    if not torch.isfinite(baseline).all():
        raise ValueError("baseline contains NaN or infinite values.")
    return baseline.expand_as(image)


def perturbation_curve(
    network: nn.Module,
    image: torch.Tensor,
    attribution: torch.Tensor,
    target: int | Sequence[int] | torch.Tensor,
    mode: str = "deletion",
    steps: int = 20,
    baseline: float | torch.Tensor = 0.0,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Softmax probability of ``target`` while the most relevant positions are deleted or inserted.

    Positions are ordered by decreasing attribution (ties: lower flat index first). At step ``k`` of
    ``0..steps`` the ``floor(k * N / steps)`` most relevant of the N positions are perturbed in every channel:
    ``"deletion"`` sets them to the baseline in the image, ``"insertion"`` copies them from the image into the
    baseline. So deletion starts from the image and ends at the baseline, insertion the other way round.

    Args:
        network: classifier returning logits (B, K) with K >= 2 classes; softmax over K gives the probability.
        image: (B, C, H, W) or (B, C, H, W, D).
        attribution: (B, 1, H, W) or (B, 1, H, W, D), any real values; shared by all channels.
        target: class index, an int for all samples or one per sample ((B,) tensor or sequence).
        mode: ``"deletion"`` or ``"insertion"``.
        steps: number of perturbation steps (the curve has ``steps + 1`` points), >= 1.
        baseline: value of removed positions: a float, or a tensor broadcastable to the image (e.g. a
            blurred copy of the image).
        batch_size: number of perturbed inputs per forward pass; ``None`` uses B, the image batch size.

    Returns:
        (B, steps + 1) probabilities.

    Raises:
        TypeError: ``image`` or ``attribution`` is not a tensor.
        ValueError: bad shapes (attribution not (B, 1, *image spatial)), NaN/inf values, bad ``mode``,
            ``steps`` or ``batch_size``, a baseline that does not broadcast, a target that is not an integer
            per sample, negative or >= the number of network outputs, a network output that is not (B, K>=2).
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}.")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be None or an integer >= 1, got {batch_size!r}.")
    image = check_map(image, "image", single_channel=False)
    attribution = check_map(attribution, "attribution").to(image.device)
    expected = (image.shape[0], 1, *image.shape[2:])
    if attribution.shape != expected:
        raise ValueError(
            f"shape mismatch: attribution {tuple(attribution.shape)} must be {expected} for image {tuple(image.shape)}."
        )
    batch, spatial = image.shape[0], image.shape[2:]
    target = _check_target(target, batch, image.device)
    base = _check_baseline(baseline, image)

    ranks = descending_ranks(flatten_samples(attribution))  # (B, N), 0 = most relevant
    counts = torch.arange(steps + 1, device=image.device) * math.prod(spatial) // steps  # (steps + 1,)
    total = batch * (steps + 1)
    chunk = batch if batch_size is None else batch_size
    probabilities = []
    with torch.no_grad(), eval_mode(network):
        for start in range(0, total, chunk):
            index = torch.arange(start, min(start + chunk, total), device=image.device)
            sample, step = index // (steps + 1), index % (steps + 1)
            perturbed = (ranks[sample] < counts[step].unsqueeze(1)).view(len(index), 1, *spatial)
            if mode == "deletion":
                inputs = torch.where(perturbed, base[sample], image[sample])
            else:
                inputs = torch.where(perturbed, image[sample], base[sample])
            logits = network(inputs)
            if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[1] < 2:
                shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                raise ValueError(f"the network must return logits of shape (N, K) with K >= 2 classes, got {shape}.")
            if start == 0 and (target >= logits.shape[1]).any():
                raise ValueError(
                    f"target class indices {target.tolist()} out of range for a network with {logits.shape[1]} outputs."
                )
            probabilities.append(torch.softmax(logits, dim=1).gather(1, target[sample].unsqueeze(1)).squeeze(1))
    return torch.cat(probabilities).view(batch, steps + 1)


def _area(curve: torch.Tensor) -> torch.Tensor:
    """Trapezoid area of (B, steps + 1) curves over x evenly spaced in [0, 1]."""
    return torch.trapezoid(curve, dx=1.0 / (curve.shape[1] - 1), dim=1)


def deletion_auc(
    network: nn.Module,
    image: torch.Tensor,
    attribution: torch.Tensor,
    target: int | Sequence[int] | torch.Tensor,
    steps: int = 20,
    baseline: float | torch.Tensor = 0.0,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Area under the deletion curve (lower means a more faithful attribution).

    See :func:`perturbation_curve` (``mode="deletion"``) for the arguments and errors.

    Returns:
        (B,) areas in [0, 1], x spanning the deleted fraction 0..1.
    """
    return _area(perturbation_curve(network, image, attribution, target, "deletion", steps, baseline, batch_size))


def insertion_auc(
    network: nn.Module,
    image: torch.Tensor,
    attribution: torch.Tensor,
    target: int | Sequence[int] | torch.Tensor,
    steps: int = 20,
    baseline: float | torch.Tensor = 0.0,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Area under the insertion curve (higher means a more faithful attribution).

    See :func:`perturbation_curve` (``mode="insertion"``) for the arguments and errors.

    Returns:
        (B,) areas in [0, 1], x spanning the inserted fraction 0..1.
    """
    return _area(perturbation_curve(network, image, attribution, target, "insertion", steps, baseline, batch_size))
