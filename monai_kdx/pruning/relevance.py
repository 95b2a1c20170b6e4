"""Per-channel relevance of every convolution and linear layer, accumulated over calibration data.

The relevance of an output channel of a layer is a non-negative score: the larger, the more the
channel contributes to the network's decision for the explained class. Channel relevances are what
relevance pruning ranks (:func:`monai_kdx.pruning.prune_by_relevance`).

Built-in methods, registered by name in :data:`monai_kdx.registry.RELEVANCE_METHODS`:

================ =========================================================================== ==================
name             channel score (``a``: layer output, ``R``: relevance at it)                  cost per batch
================ =========================================================================== ==================
``"lrp"``        LRP (``epsilon_plus_flat``, conv → batch norm folded, residuals split): Σ |R|  1 forward + 1 back
``"taylor"``     first-order Taylor (Molchanov et al. 2017): |Σ_spatial a · ∂y_t/∂a|         1 forward + 1 back
``"ig"``         integrated gradients at every layer (layer conductance): Σ |cond|            n_steps + 1 passes
``"backtrace"``  DL-Backtrace-style proportional propagation (LRP, z+ everywhere): Σ |R|     1 forward + 1 back
``"magnitude"``  L1 norm of the layer's weights (data-free baseline)                          none
``"random"``     seeded uniform random scores (baseline)                                     none
================ =========================================================================== ==================

Sums run over spatial positions and calibration samples. All layers are scored by the same passes
(hooks on every layer at once, never a loop over layers). The explained class is the true label by
default (``target="label"``) or the predicted class (``target="pred"``); every sample contributes
one unit of relevance at its target logit for ``"lrp"`` and ``"backtrace"``, which both run on the one LRP
backend of :mod:`monai_kdx.explain.lrp` (the same rules, BatchNorm merge and residual canonizer as the
explanations).

During collection the network is switched to eval mode (batch norm on running statistics, dropout
off) and each module's mode is restored afterwards; hooks are removed; gradients are taken with
``torch.autograd.grad``, so the parameters' ``.grad`` fields are never touched.

Add a method with::

    from monai_kdx.registry import RELEVANCE_METHODS
    from monai_kdx.pruning import RelevanceMethod

    @RELEVANCE_METHODS.register("my-score")
    class MyScore(RelevanceMethod):
        def __call__(self, network, layers, image, target): ...  # -> BatchRelevance
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from monai_kdx.networks import (
    FeatureCapture,
    as_plain_tensor,
    class_indices,
    device_of,
    resolve_targets,
    restore_mode,
    split_batch,
    unwrap_network,
)
from monai_kdx.registry import RELEVANCE_METHODS

__all__ = [
    "BatchRelevance",
    "RelevanceMethod",
    "LRPRelevance",
    "TaylorRelevance",
    "IntegratedGradientsRelevance",
    "BacktraceRelevance",
    "MagnitudeRelevance",
    "RandomRelevance",
    "collect_relevance",
    "prunable_layers",
    "resolve_relevance_method",
]

_TARGETS = ("label", "pred")


# ----------------------------------------------------------------------------------------------------------------------
# helpers shared by the methods
# ----------------------------------------------------------------------------------------------------------------------
def prunable_layers(network: nn.Module) -> dict[str, nn.Module]:
    """The layers whose output channels get a relevance: every ``Conv1d/2d/3d`` and ``nn.Linear``.

    Args:
        network: a model (a DDP/DataParallel wrapper is unwrapped).

    Returns:
        Module path → module, in definition order.
    """
    layers = {}
    for name, module in unwrap_network(network).named_modules():
        if isinstance(module, nn.Linear) or (
            isinstance(module, nn.modules.conv._ConvNd) and not getattr(module, "transposed", False)
        ):
            layers[name] = module
    return layers


def _logits(output: Any) -> torch.Tensor:
    if not isinstance(output, torch.Tensor) or output.ndim != 2:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise TypeError(f"relevance needs a classifier returning logits of shape (B, num_classes), got {shape}.")
    return output


def _channel_sum(tensor: torch.Tensor, module: nn.Module, absolute: bool = True) -> torch.Tensor:
    """Sum a layer's per-position scores into per-channel scores (B, C).

    Conv outputs are (B, C, *spatial); linear outputs are (B, ..., C).
    """
    if isinstance(module, nn.Linear):
        tensor = tensor.movedim(-1, 1)
    if absolute:
        tensor = tensor.abs()
    return tensor.reshape(tensor.shape[0], tensor.shape[1], -1).sum(-1)


def _flatten(store: Mapping[str, list[torch.Tensor]]) -> tuple[list[str], list[torch.Tensor]]:
    """Every captured output that is part of the graph, with its layer path (a path repeats per call)."""
    paths, tensors = [], []
    for path, outputs in store.items():
        for output in outputs:
            if isinstance(output, torch.Tensor) and output.requires_grad:
                paths.append(path)
                tensors.append(output)
    return paths, tensors


def _sum_per_layer(
    layers: Mapping[str, nn.Module], paths: list[str], values: Iterable[torch.Tensor | None], batch_size: int
) -> dict[str, torch.Tensor]:
    """Add per-call (B, C) scores of the same layer; layers never reached score zero."""
    result: dict[str, torch.Tensor] = {}
    for path, value in zip(paths, values, strict=True):
        if value is None:
            continue
        result[path] = result[path] + value if path in result else value
    for path, module in layers.items():
        if path not in result:
            width = module.out_features if isinstance(module, nn.Linear) else module.out_channels
            result[path] = torch.zeros(batch_size, width, device=device_of(module))
    return {path: result[path].detach() for path in layers}


# ----------------------------------------------------------------------------------------------------------------------
# methods
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class BatchRelevance:
    """Relevance of one calibration batch.

    Attributes:
        relevance: layer path → per-sample channel relevance (B, C_out).
        target: the explained class of each sample (B,).
        num_outputs: the number of network outputs (classes).
    """

    relevance: dict[str, torch.Tensor]
    target: torch.Tensor
    num_outputs: int


class RelevanceMethod:
    """Base class of relevance methods (the interface :func:`collect_relevance` calls).

    A data-driven method implements ``__call__(network, layers, image, target) -> BatchRelevance`` for one batch:
    ``image`` is (B, C_in, H, W) or (B, C_in, H, W, D), ``target`` the class indices (B,) or None for the predicted
    class; the network is already in eval mode. A data-free method sets ``data_free = True`` and implements
    :meth:`data_free_relevance` instead.
    """

    data_free: bool = False

    def __call__(
        self, network: nn.Module, layers: Mapping[str, nn.Module], image: torch.Tensor, target: torch.Tensor | None
    ) -> BatchRelevance:
        raise NotImplementedError(f"{type(self).__name__} is data-free; use data_free_relevance().")

    def data_free_relevance(self, network: nn.Module, layers: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
        """Relevance (C_out,) of every layer computed from the weights alone."""
        raise NotImplementedError(f"{type(self).__name__} needs calibration data.")


@RELEVANCE_METHODS.register("taylor")
class TaylorRelevance(RelevanceMethod):
    """First-order Taylor criterion of Molchanov et al. (ICLR 2017, "Pruning convolutional neural networks for
    resource efficient inference"): the estimated change of the objective when a channel is zeroed,
    ``|Σ_spatial a · ∂y_t/∂a|`` per sample (absolute value of the channel's summed activation × gradient), summed
    over samples. The objective ``y_t`` is the target logit (not the loss). One forward and one backward per batch.

    Args:
        absolute: take the absolute value per sample and channel (the criterion); False keeps the signed sums.
    """

    def __init__(self, absolute: bool = True) -> None:
        self.absolute = absolute

    def __call__(self, network, layers, image, target):
        with torch.enable_grad():
            x = image.detach().requires_grad_(True)
            with FeatureCapture(network, list(layers), every_call=True) as store:
                logits = _logits(network(x))
            target = resolve_targets(target, logits, name="label")
            score = logits.gather(1, target[:, None]).sum()
            paths, tensors = _flatten(store)
            grads = torch.autograd.grad(score, tensors, allow_unused=True) if tensors else []
        values = []
        for path, tensor, grad in zip(paths, tensors, grads, strict=True):
            if grad is None:
                values.append(None)
                continue
            summed = _channel_sum(tensor.detach() * grad, layers[path], absolute=False)
            values.append(summed.abs() if self.absolute else summed)
        relevance = _sum_per_layer(layers, paths, values, x.shape[0])
        return BatchRelevance(relevance, target, logits.shape[1])


@RELEVANCE_METHODS.register("lrp")
class LRPRelevance(RelevanceMethod):
    """Layer-wise relevance propagation: relevance at each layer's output, ``Σ_spatial |R|``.

    The rules come from the one LRP backend (:func:`monai_kdx.explain.lrp_composite`): the composite (default
    ``epsilon_plus_flat``: flat rule for the first layer, z+ for convolutions, epsilon for dense layers,
    pass-through for activations and unmerged batch norms, norm rule for average pooling), every batch norm that
    reads a convolution's output directly folded into it (pairs traced from the autograd graph), and residual
    additions (MONAI ResNet blocks, the students' residual block) split in proportion to their summands, so
    relevance is conserved across residual blocks. Every sample starts with unit relevance at its target logit; the
    relevance arriving at a layer's output during zennit's modified backward is read for all layers in the same
    single backward pass (zennit's rules pass relevance as the gradient).

    Args:
        composite: a composite name of :data:`monai_kdx.explain.LRP_COMPOSITES` (e.g. ``"epsilon_plus_flat"``,
            ``"epsilon_alpha2_beta1_flat"``, ``"zplus"``).
        composite_kwargs: options of the composite (``epsilon``, ``gamma``, ``stabilizer``, ``zero_bias``, ...).
        merge_batchnorm: fold conv → batch norm pairs for the duration of the call.
        absolute: sum ``|R|`` (default) or the signed relevance (for conservation checks).

    Raises:
        ValueError: an unknown composite (the valid ones are listed).
    """

    def __init__(
        self,
        composite: str = "epsilon_plus_flat",
        composite_kwargs: Mapping[str, Any] | None = None,
        merge_batchnorm: bool = True,
        absolute: bool = True,
    ) -> None:
        from monai_kdx.explain.lrp import LRP_COMPOSITES

        if composite not in LRP_COMPOSITES:
            raise ValueError(f"unknown LRP composite {composite!r}; valid composites: {list(LRP_COMPOSITES)}.")
        self.composite = composite
        self.composite_kwargs = dict(composite_kwargs or {})
        self.merge_batchnorm = merge_batchnorm
        self.absolute = absolute

    def __call__(self, network, layers, image, target):
        from monai_kdx.explain.lrp import lrp_composite

        composite = lrp_composite(
            network, image, self.composite, merge_batchnorm=self.merge_batchnorm, **self.composite_kwargs
        )
        with torch.enable_grad():
            x = image.detach().requires_grad_(True)
            # layer hooks first, then zennit's: the captured tensors are the layers' own outputs
            with (
                FeatureCapture(network, list(layers), every_call=True) as store,
                composite.context(network) as modified,
            ):
                logits = _logits(modified(x))
                target = resolve_targets(target, logits, name="label")
                seed = F.one_hot(target, logits.shape[1]).to(logits.dtype)
                paths, tensors = _flatten(store)
                grads = torch.autograd.grad(logits, tensors, grad_outputs=seed, allow_unused=True) if tensors else []
        values = [
            None if grad is None else _channel_sum(grad, layers[path], absolute=self.absolute)
            for path, grad in zip(paths, grads, strict=True)
        ]
        relevance = _sum_per_layer(layers, paths, values, x.shape[0])
        return BatchRelevance(relevance, target, logits.shape[1])


@RELEVANCE_METHODS.register("backtrace")
class BacktraceRelevance(LRPRelevance):
    """DL-Backtrace-style proportional propagation, as an LRP composite: the z+ rule on every convolution and
    linear layer, ``R_i = Σ_j (z_ij⁺ / Σ_k z_kj⁺) · R_j`` with ``z⁺`` the positive contributions of positive inputs
    and the negative-weight contributions of negative inputs (the bias receives nothing, so relevance is conserved
    layer to layer), batch norms passing relevance through unchanged, every other operation (pooling, residual sums)
    splitting it in proportion to its inputs. Channel score: ``Σ_spatial |R|``.

    Args:
        stabilizer: floor of the positive-contribution denominators.
        absolute: sum ``|R|`` (default) or the signed relevance (for conservation checks).
    """

    def __init__(self, stabilizer: float = 1e-9, absolute: bool = True) -> None:
        options = {"stabilizer": stabilizer, "zero_bias": True}
        super().__init__("zplus", options, merge_batchnorm=False, absolute=absolute)


@RELEVANCE_METHODS.register("ig")
class IntegratedGradientsRelevance(RelevanceMethod):
    """Integrated gradients read at every layer: the layer conductance of Dhamdhere et al. (2018, "How important is a
    neuron?"), as captum's ``LayerConductance`` defines it, for all layers in the same passes.

    Inputs follow the straight path from ``baseline`` to the image at ``n_steps + 1`` points ``α_k = k / n_steps``;
    for a layer output ``a`` the conductance is ``Σ_k (a(α_{k+1}) − a(α_k)) · ∂y_t/∂a(α_k)`` (completeness: over a
    layer that cuts the network it sums to ``y_t(x) − y_t(baseline)``). Channel score: ``Σ_spatial |conductance|``.
    Costs ``n_steps + 1`` forward/backward passes per image, batched ``internal_batch_size`` inputs at a time.

    Args:
        n_steps: number of path segments.
        baseline: the constant baseline image value (default black, 0).
        internal_batch_size: at most this many interpolated inputs per forward pass.
        absolute: sum ``|conductance|`` (default) or the signed conductance.
    """

    def __init__(
        self, n_steps: int = 16, baseline: float = 0.0, internal_batch_size: int = 64, absolute: bool = True
    ) -> None:
        if n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {n_steps}.")
        self.n_steps = n_steps
        self.baseline = baseline
        self.internal_batch_size = internal_batch_size
        self.absolute = absolute

    def __call__(self, network, layers, image, target):
        image = image.detach()
        batch = image.shape[0]
        if target is None:
            with torch.no_grad():
                target = resolve_targets(None, _logits(network(image)))
        alphas = torch.linspace(0.0, 1.0, self.n_steps + 1, dtype=image.dtype, device=image.device)
        per_chunk = max(1, self.internal_batch_size // batch)
        baseline = torch.full_like(image, self.baseline)
        previous: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        totals: dict[str, torch.Tensor] = {}
        num_outputs = 0
        for start in range(0, len(alphas), per_chunk):
            chunk = alphas[start : start + per_chunk]
            steps = len(chunk)
            shape = (steps,) + (1,) * image.ndim
            x = (baseline.unsqueeze(0) + chunk.view(shape) * (image - baseline).unsqueeze(0)).flatten(0, 1)
            with torch.enable_grad():
                x.requires_grad_(True)
                with FeatureCapture(network, list(layers), every_call=True) as store:
                    logits = _logits(network(x))
                num_outputs = logits.shape[1]
                resolve_targets(target, logits[:batch], name="label")  # validates the labels
                score = logits.gather(1, target.repeat(steps)[:, None]).sum()
                paths, tensors = _flatten(store)
                grads = torch.autograd.grad(score, tensors, allow_unused=True) if tensors else []
            seen: dict[str, int] = {}
            for path, tensor, grad in zip(paths, tensors, grads, strict=True):
                key = f"{path}#{seen.get(path, 0)}"  # a layer called several times per forward: one path per call
                seen[path] = seen.get(path, 0) + 1
                act = tensor.detach().unflatten(0, (steps, batch))
                grad = torch.zeros_like(act) if grad is None else grad.detach().unflatten(0, (steps, batch))
                if key in previous:  # join the last point of the previous chunk
                    act = torch.cat([previous[key][0][None], act])
                    grad = torch.cat([previous[key][1][None], grad])
                previous[key] = (act[-1], grad[-1])
                if act.shape[0] < 2:
                    continue
                conductance = ((act[1:] - act[:-1]) * grad[:-1]).sum(0)  # (B, C, *spatial)
                totals[key] = totals[key] + conductance if key in totals else conductance
        values, keyed_paths = [], []
        for key, conductance in totals.items():
            path = key.rsplit("#", 1)[0]
            keyed_paths.append(path)
            values.append(_channel_sum(conductance, layers[path], absolute=self.absolute))
        relevance = _sum_per_layer(layers, keyed_paths, values, batch)
        return BatchRelevance(relevance, target, num_outputs)


@RELEVANCE_METHODS.register("magnitude")
class MagnitudeRelevance(RelevanceMethod):
    """Data-free baseline: the L1 norm of each output channel's weights (``Σ |W[c]|``)."""

    data_free = True

    def data_free_relevance(self, network, layers):
        return {path: module.weight.detach().abs().flatten(1).sum(1).float().cpu() for path, module in layers.items()}


@RELEVANCE_METHODS.register("random")
class RandomRelevance(RelevanceMethod):
    """Data-free baseline: uniform random scores from a generator seeded with ``seed`` (reproducible).

    Args:
        seed: the generator's seed.
    """

    data_free = True

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def data_free_relevance(self, network, layers):
        generator = torch.Generator().manual_seed(self.seed)
        result = {}
        for path, module in layers.items():
            width = module.out_features if isinstance(module, nn.Linear) else module.out_channels
            result[path] = torch.rand(width, generator=generator)
        return result


# ----------------------------------------------------------------------------------------------------------------------
# collection over a loader
# ----------------------------------------------------------------------------------------------------------------------
def resolve_relevance_method(method: str | RelevanceMethod) -> RelevanceMethod:
    """A relevance method instance from a registered name (or the instance itself).

    Raises:
        KeyError: an unknown name; the message lists the registered methods.
        TypeError: neither a name nor a method object.
    """
    if isinstance(method, str):
        entry = RELEVANCE_METHODS.get(method)
        return entry() if callable(entry) else entry
    if isinstance(method, RelevanceMethod) or (callable(method) and hasattr(method, "data_free")):
        return method
    raise TypeError(f"method must be a registered name or a RelevanceMethod, got {type(method).__name__}.")


def _is_iterator(loader: Any) -> bool:
    return iter(loader) is loader


def collect_relevance(
    network: nn.Module,
    loader: Iterable[Any] | None,
    method: str | RelevanceMethod = "lrp",
    target: str = "label",
    per_class: bool = False,
    max_batches: int | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Per-channel relevance of every convolution and linear layer, accumulated over a calibration loader.

    Args:
        network: a classifier returning logits (B, num_classes) for images (B, C_in, H, W) or (B, C_in, H, W, D);
            DDP/DataParallel wrappers are unwrapped. Its train/eval modes are restored afterwards.
        loader: calibration batches: MONAI dict batches with ``"image"`` and ``"label"``, ``(image, label)`` pairs
            or image tensors (these need ``target="pred"``). Labels may be (B,), (B, 1) or one-hot (B, K). May be
            None for data-free methods (``"magnitude"``, ``"random"``).
        method: a name registered in :data:`monai_kdx.registry.RELEVANCE_METHODS` (``"lrp"``, ``"ig"``,
            ``"taylor"``, ``"backtrace"``, ``"magnitude"``, ``"random"``) or a :class:`RelevanceMethod` instance.
        target: explain the true ``"label"`` (default) or the predicted class ``"pred"``.
        per_class: return (num_classes, C_out) per layer, row k accumulated over the samples whose target is k
            (data-free methods: the same scores in every row).
        max_batches: use at most this many batches.
        progress: show a progress bar (tqdm).

    Returns:
        Layer path → relevance (C_out,) (or (num_classes, C_out) with ``per_class``), float32 on the CPU, summed over
        positions and samples; under ``torch.distributed`` summed over all ranks.

    Raises:
        KeyError: an unknown method name (the registered ones are listed).
        ValueError: an empty loader, a bad ``target`` or ``max_batches``, labels that do not fit the output.
        TypeError: batches of an unknown kind, or a network that does not return (B, num_classes) logits.
    """
    if target not in _TARGETS:
        raise ValueError(f"target must be one of {_TARGETS}, got {target!r}.")
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}.")
    scorer = resolve_relevance_method(method)
    model = unwrap_network(network)
    layers = prunable_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Conv1d/2d/3d or Linear layer to score.")

    if getattr(scorer, "data_free", False):
        scores = {path: value.float().cpu() for path, value in scorer.data_free_relevance(model, layers).items()}
        if per_class:
            from monai_kdx.networks import num_classes_of

            classes = num_classes_of(model) or 1
            scores = {path: value.expand(classes, -1).clone() for path, value in scores.items()}
        return scores

    if loader is None:
        raise ValueError(f"relevance method {method!r} needs a calibration loader, got None.")
    device = device_of(model)
    totals: dict[str, torch.Tensor] = {}
    seen = 0
    iterator: Iterable[Any] = loader
    if progress:
        from monai.utils import optional_import

        tqdm, has_tqdm = optional_import("tqdm", name="tqdm")
        if has_tqdm:
            iterator = tqdm(loader, desc=f"relevance ({method if isinstance(method, str) else type(method).__name__})")
    with restore_mode(model):
        for batch in iterator:
            if max_batches is not None and seen >= max_batches:
                break
            image, label = split_batch(batch)
            image = as_plain_tensor(image).to(device)
            labels = None
            if target == "label":
                if label is None:
                    raise ValueError("target='label' needs labelled batches ('label' key or (image, label) pairs).")
                labels = class_indices(label, image.shape[0], one_hot=True, device=device)
            result = scorer(model, layers, image, labels)
            for path, value in result.relevance.items():
                value = value.detach().double()
                if per_class:
                    summed = torch.zeros(result.num_outputs, value.shape[1], dtype=value.dtype, device=value.device)
                    summed.index_add_(0, result.target.to(value.device), value)
                else:
                    summed = value.sum(0)
                totals[path] = totals[path] + summed if path in totals else summed
            seen += 1
    if seen == 0:
        raise ValueError("the calibration loader is empty: relevance needs at least one batch.")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for path in sorted(totals):  # the same order on every rank
            torch.distributed.all_reduce(totals[path], op=torch.distributed.ReduceOp.SUM)
    for path, value in totals.items():
        if not torch.isfinite(value).all():
            raise ValueError(f"relevance of layer {path!r} is not finite (method {method!r}); check the inputs.")
    return {path: totals[path].float().cpu() for path in layers}
