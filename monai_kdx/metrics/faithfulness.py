"""Faithfulness of an attribution map: deletion and insertion curves (Petsiuk et al., "RISE: randomized input
sampling for explanation of black-box models", BMVC 2018).

Deletion replaces the most relevant pixels/voxels first with a baseline and watches the class probability
fall (a faithful map gives a low area); insertion starts from the baseline and restores the most relevant
positions first (a faithful map gives a high area). All perturbation steps of all samples are evaluated in
chunks under ``torch.no_grad()`` with the network in eval mode; each module's mode is restored afterwards.

What replaces a removed position matters: a constant (the default 0, the mean of a normalized image) pushes the
image out of the distribution the network was trained on, so every map, a random one included, makes the
probability fall (Rong et al., "A consistent and efficient evaluation strategy for attribution methods", ICML
2022). Baselines that stay closer to the data (see :data:`BASELINES`):

- ``"blur"``: a Gaussian-blurred copy of the image (σ = 2 pixels/voxels): the structure is removed, the intensities
  stay;
- ``"noise"``: Gaussian noise with the image's own mean and standard deviation, per image and channel (seeded);
- ``"road"``: ROAD's "remove and debias": removed positions are imputed from the positions that are kept, by
  normalized convolution (the kept values diffused into the removed region), plus a little noise (σ = 5% of the
  image's standard deviation), so the shape of the removed region does not leak the ranking. This approximates
  ROAD's noisy linear imputation with a few 3-wide averaging passes instead of a sparse linear solve.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from monai_kdx.networks import class_indices, float32_or_wider, restore_mode

from ._common import check_map, descending_ranks, flatten_samples

__all__ = ["BASELINES", "perturbation_curve", "deletion_auc", "insertion_auc"]

_MODES = ("deletion", "insertion")
BASELINES = ("blur", "noise", "road")
"""Named baselines of :func:`perturbation_curve` besides a constant or a tensor (see the module docs)."""

_ROAD_PASSES = 12
_ROAD_NOISE = 0.05


def _average(x: torch.Tensor) -> torch.Tensor:
    """A 3-wide box average over every spatial axis (zero padding), (N, C, *spatial) → same shape."""
    pool = {1: torch.nn.functional.avg_pool1d, 2: torch.nn.functional.avg_pool2d, 3: torch.nn.functional.avg_pool3d}
    return pool[x.ndim - 2](x, 3, stride=1, padding=1, count_include_pad=True)


def _blurred(image: torch.Tensor, passes: int = 5) -> torch.Tensor:
    """A Gaussian-like blur (repeated box averages, σ ≈ 1.8 for 5 passes), border-normalized."""
    values, weights = image, torch.ones_like(image[:, :1])
    for _ in range(passes):
        values, weights = _average(values), _average(weights)
    return values / weights


def _road_imputation(image: torch.Tensor, keep: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``image`` where ``keep``, elsewhere the kept values diffused by normalized convolution plus a little noise;
    (N, C, *spatial) image, (N, 1, *spatial) boolean keep."""
    weight = keep.to(image.dtype)
    values, weights = image * weight, weight
    for _ in range(_ROAD_PASSES):
        values, weights = _average(values), _average(weights)
    dims = tuple(range(2, image.ndim))
    kept_mean = (image * weight).sum(dims, keepdim=True) / weight.sum(dims, keepdim=True).clamp_min(1.0)
    estimate = torch.where(weights > 1e-6, values / weights.clamp_min(1e-6), kept_mean)
    scale = image.flatten(2).std(dim=2).view(*image.shape[:2], *[1] * len(dims))
    noise = torch.randn(image.shape, generator=generator, dtype=image.dtype).to(image.device) * scale * _ROAD_NOISE
    return torch.where(keep, image, estimate + noise)


def _check_baseline(baseline: float | torch.Tensor | str, image: torch.Tensor, seed: int) -> torch.Tensor | None:
    """The baseline expanded to the image's shape (B, C, *spatial); None for ``"road"`` (computed per step)."""
    if isinstance(baseline, str):
        if baseline not in BASELINES:
            raise ValueError(f"baseline must be a number, a tensor or one of {BASELINES}, got {baseline!r}.")
        if baseline == "road":
            return None
        if baseline == "blur":
            return _blurred(image)
        dims = tuple(range(2, image.ndim))
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(image.shape, generator=generator, dtype=image.dtype).to(image.device)
        return image.mean(dims, keepdim=True) + noise * image.std(dim=dims, keepdim=True)
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
    baseline: float | torch.Tensor | str = 0.0,
    batch_size: int | None = None,
    seed: int = 0,
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
        baseline: value of removed positions: a float, a tensor broadcastable to the image, or ``"blur"``,
            ``"noise"``, ``"road"`` (see the module docs).
        batch_size: number of perturbed inputs per forward pass; ``None`` uses B, the image batch size.
        seed: seed of the ``"noise"`` and ``"road"`` baselines (the same seed gives the same curve).

    The image goes to the network in its own dtype (a float16 network gets float16 inputs); the softmax and
    the curve are computed in float32 at least.

    Returns:
        (B, steps + 1) probabilities, float32 (float64 for float64 logits).

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
    target = class_indices(target, batch, broadcast=True, name="target", device=image.device)
    base = _check_baseline(baseline, image, seed)
    generator = torch.Generator().manual_seed(seed)

    ranks = descending_ranks(flatten_samples(attribution))  # (B, N), 0 = most relevant
    counts = torch.arange(steps + 1, device=image.device) * math.prod(spatial) // steps  # (steps + 1,)
    total = batch * (steps + 1)
    chunk = batch if batch_size is None else batch_size
    probabilities = []
    with torch.no_grad(), restore_mode(network):
        for start in range(0, total, chunk):
            index = torch.arange(start, min(start + chunk, total), device=image.device)
            sample, step = index // (steps + 1), index % (steps + 1)
            perturbed = (ranks[sample] < counts[step].unsqueeze(1)).view(len(index), 1, *spatial)
            keep = ~perturbed if mode == "deletion" else perturbed
            if base is None:
                inputs = _road_imputation(image[sample], keep, generator)
            else:
                inputs = torch.where(keep, image[sample], base[sample])
            logits = network(inputs)
            if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[1] < 2:
                shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                raise ValueError(f"the network must return logits of shape (N, K) with K >= 2 classes, got {shape}.")
            if start == 0 and (target >= logits.shape[1]).any():
                raise ValueError(
                    f"target class indices {target.tolist()} out of range for a network with {logits.shape[1]} outputs."
                )
            probabilities.append(
                torch.softmax(float32_or_wider(logits), dim=1).gather(1, target[sample].unsqueeze(1)).squeeze(1)
            )
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
    baseline: float | torch.Tensor | str = 0.0,
    batch_size: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Area under the deletion curve (lower means a more faithful attribution).

    See :func:`perturbation_curve` (``mode="deletion"``) for the arguments and errors.

    Returns:
        (B,) areas in [0, 1], x spanning the deleted fraction 0..1.
    """
    curve = perturbation_curve(network, image, attribution, target, "deletion", steps, baseline, batch_size, seed)
    return _area(curve)


def insertion_auc(
    network: nn.Module,
    image: torch.Tensor,
    attribution: torch.Tensor,
    target: int | Sequence[int] | torch.Tensor,
    steps: int = 20,
    baseline: float | torch.Tensor | str = 0.0,
    batch_size: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Area under the insertion curve (higher means a more faithful attribution).

    See :func:`perturbation_curve` (``mode="insertion"``) for the arguments and errors.

    Returns:
        (B,) areas in [0, 1], x spanning the inserted fraction 0..1.
    """
    curve = perturbation_curve(network, image, attribution, target, "insertion", steps, baseline, batch_size, seed)
    return _area(curve)
