"""Concept-based explanations: concept activation vectors (CAVs) and TCAV scores (Kim et al. 2018,
"Interpretability Beyond Feature Attribution"), in 2D and 3D.

A concept is a set of example inputs (e.g. lesion-texture patches cut from the datasets' masks,
:func:`concept_patches`). At a layer, a linear classifier separates the examples' activations from
those of random examples; its unit normal is the CAV ``v``. The TCAV score of class ``k`` is the
fraction of inputs of that class whose logit grows along ``v`` (``∇_a z_k · v > 0``). Repeating with
several random sets, and comparing with CAVs trained on random-vs-random sets, gives a two-sided
t-test: a concept is significant when its scores differ from the random ones (``p < alpha``).

Activations are pooled over space (``pooling="mean"``, a (C,) vector per example, so patches of any
size work and 3D stays small) or flattened (``pooling="flatten"``, examples of one size).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from monai_kdx.networks import FeatureCapture, resolve_targets, restore_mode

from .base import check_inputs

__all__ = ["TCAV", "TCAVResult", "concept_patches", "fit_cav"]


def concept_patches(
    images: torch.Tensor, masks: torch.Tensor, patch_size: int | Sequence[int], n_per_image: int = 1, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concept examples centred on mask voxels, and random examples that do not touch any mask.

    Args:
        images: (N, C, *spatial) images (2D or 3D).
        masks: (N, 1, *spatial) binary masks (e.g. lesions); images with an empty mask give only random patches.
        patch_size: patch size (int or one per spatial axis), at most the image size.
        n_per_image: patches of each kind per image.
        seed: random seed.

    Returns:
        ``(concept, random)``: (K, C, *patch) and (M, C, *patch) tensors.

    Raises:
        ValueError: mismatched shapes, a patch larger than the image, or no mask voxel at all.
    """
    if images.ndim not in (4, 5) or masks.shape != (images.shape[0], 1, *images.shape[2:]):
        raise ValueError(
            f"images (N, C, *spatial) and masks (N, 1, *spatial) do not match: {tuple(images.shape)}, "
            f"{tuple(masks.shape)}."
        )
    spatial = images.shape[2:]
    size = [patch_size] * len(spatial) if isinstance(patch_size, int) else list(patch_size)
    if len(size) != len(spatial) or any(p > s or p < 1 for p, s in zip(size, spatial, strict=True)):
        raise ValueError(f"patch size {size} does not fit images of spatial size {tuple(spatial)}.")
    if not (masks > 0).any():
        raise ValueError("the masks are all empty: no concept examples to cut.")
    rng = np.random.default_rng(seed)
    concept, random = [], []

    def cut(n: int, corner: Sequence[int]) -> torch.Tensor:
        window = tuple(slice(c, c + p) for c, p in zip(corner, size, strict=True))
        return images[(n, slice(None), *window)]

    for n in range(images.shape[0]):
        inside = (masks[n, 0] > 0).nonzero().numpy()
        for _ in range(n_per_image if len(inside) else 0):
            centre = inside[rng.integers(len(inside))]
            corner = [int(np.clip(c - p // 2, 0, s - p)) for c, p, s in zip(centre, size, spatial, strict=True)]
            concept.append(cut(n, corner))
        for _ in range(n_per_image):
            for _attempt in range(50):
                corner = [int(rng.integers(0, s - p + 1)) for p, s in zip(size, spatial, strict=True)]
                window = tuple(slice(c, c + p) for c, p in zip(corner, size, strict=True))
                if not (masks[(n, 0, *window)] > 0).any():
                    random.append(cut(n, corner))
                    break
    if not random:
        raise ValueError("no random patch avoids the masks; use a smaller patch_size.")
    return torch.stack(concept), torch.stack(random)


def fit_cav(positive: torch.Tensor, negative: torch.Tensor, l2: float = 1e-3, steps: int = 100) -> torch.Tensor:
    """The unit normal of a logistic-regression boundary between two activation sets.

    Args:
        positive: (P, F) activations of the concept examples.
        negative: (Q, F) activations of the other examples.
        l2: weight decay of the classifier.
        steps: L-BFGS iterations.

    Returns:
        (F,) unit vector pointing toward the concept.
    """
    x = torch.cat([positive, negative]).double()
    y = torch.cat([torch.ones(len(positive)), torch.zeros(len(negative))]).double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-8)
    x = (x - mean) / std
    weight = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(x @ weight + bias, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    direction = weight.detach() / std  # back to the unstandardized activation space
    return (direction / direction.norm().clamp_min(1e-12)).float()


@dataclass
class TCAVResult:
    """TCAV of one concept at one layer for one class.

    Attributes:
        score: mean TCAV score over the runs (fraction of inputs whose logit grows along the CAV).
        scores: (R,) score of each run (concept vs a random set).
        random_scores: (R,) scores of random-vs-random CAVs, the null distribution.
        p_value: two-sided t-test of ``scores`` against ``random_scores``.
        significant: ``p_value < alpha``.
    """

    score: float
    scores: np.ndarray = field(repr=False)
    random_scores: np.ndarray = field(repr=False)
    p_value: float
    significant: bool


class TCAV:
    """Concept activation vectors and TCAV scores at several layers of a 2D or 3D classifier.

    Args:
        network: a classifier returning (B, num_classes) logits.
        layers: module paths whose activations define the concept space.
        pooling: ``"mean"`` (spatial mean: a (C,) vector per example) or ``"flatten"``.
        batch_size: examples per forward pass.

    Example:
        >>> lesion, background = concept_patches(volumes, lesion_masks, patch_size=32, n_per_image=2)
        >>> tcav = TCAV(network, ["features.denseblock2", "features.denseblock3"])
        >>> results = tcav.run(lesion, background, test_volumes, target=2, runs=10)
        >>> results["features.denseblock3"].score, results["features.denseblock3"].significant
    """

    def __init__(
        self, network: nn.Module, layers: Sequence[str], pooling: str = "mean", batch_size: int = 16
    ) -> None:
        if pooling not in ("mean", "flatten"):
            raise ValueError(f"pooling must be 'mean' or 'flatten', got {pooling!r}.")
        if not layers:
            raise ValueError("TCAV needs at least one layer.")
        self.network = network
        self.capture = FeatureCapture(network, list(layers))  # checks the paths now
        self.layers = list(layers)
        self.pooling = pooling
        self.batch_size = batch_size

    def _pool(self, activation: torch.Tensor) -> torch.Tensor:
        return activation.flatten(2).mean(-1) if self.pooling == "mean" else activation.flatten(1)

    @torch.no_grad()
    def activations(self, examples: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pooled activations of ``examples`` (N, C, *spatial) at every layer: layer → (N, F)."""
        check_inputs(self.network, examples)
        chunks: dict[str, list[torch.Tensor]] = {layer: [] for layer in self.layers}
        with restore_mode(self.network, training=False):
            for start in range(0, len(examples), self.batch_size):
                with self.capture as features:
                    self.network(examples[start : start + self.batch_size])
                    for layer in self.layers:
                        chunks[layer].append(self._pool(features[layer]).cpu())
        return {layer: torch.cat(values) for layer, values in chunks.items()}

    def directional_derivatives(
        self, inputs: torch.Tensor, target: int | torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """Gradients of the target logit with respect to each layer's pooled activation: layer → (B, F),
        from one forward and one backward pass per batch."""
        check_inputs(self.network, inputs)
        grads: dict[str, list[torch.Tensor]] = {layer: [] for layer in self.layers}
        with torch.enable_grad(), restore_mode(self.network, training=False):
            for start in range(0, len(inputs), self.batch_size):
                batch = inputs[start : start + self.batch_size]
                if not any(p.requires_grad for p in self.network.parameters()):
                    batch = batch.detach().requires_grad_(True)
                chunk_target = target[start : start + self.batch_size] if isinstance(target, torch.Tensor) else target
                with self.capture as features:
                    logits = self.network(batch)
                    classes = resolve_targets(chunk_target, logits)
                    score = logits.gather(1, classes.view(-1, 1)).sum()
                    values = torch.autograd.grad(score, [features[layer] for layer in self.layers])
                for layer, grad in zip(self.layers, values, strict=True):
                    # d z / d(pooled a): the gradient map summed over space (mean pooling spreads it evenly)
                    pooled = grad.flatten(2).sum(-1) if self.pooling == "mean" else grad.flatten(1)
                    grads[layer].append(pooled.cpu())
        return {layer: torch.cat(values) for layer, values in grads.items()}

    def run(
        self,
        concept: torch.Tensor,
        random: torch.Tensor,
        inputs: torch.Tensor,
        target: int | torch.Tensor | None,
        runs: int = 10,
        alpha: float = 0.05,
        seed: int = 0,
    ) -> dict[str, TCAVResult]:
        """TCAV of ``concept`` for the class ``target`` of ``inputs``, at every layer.

        Each run trains a CAV for the concept against a random subset of ``random`` (as many as there
        are concept examples) and a random CAV for another random subset against it.

        Args:
            concept: (K, C, *patch) concept examples.
            random: (M, C, *patch) random examples, M ≥ 2K.
            inputs: (B, C, *spatial) inputs to score (e.g. test images of the class).
            target: the class (int), one class per input ((B,) tensor), or None (each input's prediction).
            runs: number of random sets (≥ 2 for the t-test).
            alpha: significance level.
            seed: random seed of the subsets.

        Returns:
            Layer path → :class:`TCAVResult`.

        Raises:
            ValueError: fewer than 2 runs, or too few random examples.
        """
        from scipy import stats

        if runs < 2:
            raise ValueError(f"runs must be >= 2 for the significance test, got {runs}.")
        if len(random) < 2 * len(concept):
            raise ValueError(f"need at least {2 * len(concept)} random examples for {len(concept)} concept examples.")
        concept_acts, random_acts = self.activations(concept), self.activations(random)
        derivatives = self.directional_derivatives(inputs, target)
        generator = torch.Generator().manual_seed(seed)
        results = {}
        for layer in self.layers:
            scores, random_scores = [], []
            for _ in range(runs):
                order = torch.randperm(len(random), generator=generator)
                negatives, others = order[: len(concept)], order[len(concept) : 2 * len(concept)]
                cav = fit_cav(concept_acts[layer], random_acts[layer][negatives])
                random_cav = fit_cav(random_acts[layer][others], random_acts[layer][negatives])
                scores.append(float((derivatives[layer] @ cav > 0).float().mean()))
                random_scores.append(float((derivatives[layer] @ random_cav > 0).float().mean()))
            scores_array, random_array = np.array(scores), np.array(random_scores)
            if np.ptp(np.concatenate([scores_array, random_array])) == 0:
                p_value = 1.0
            else:
                p_value = float(stats.ttest_ind(scores_array, random_array, equal_var=False).pvalue)
            results[layer] = TCAVResult(
                score=float(scores_array.mean()),
                scores=scores_array,
                random_scores=random_array,
                p_value=p_value,
                significant=bool(p_value < alpha),
            )
        return results
