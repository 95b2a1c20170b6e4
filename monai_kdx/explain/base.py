"""What every explainer shares: one ``attribute(inputs, target)`` verb, input checks before any work,
per-sample targets, and a network whose train/eval mode is restored afterwards.

Explainers (CAM modes, pixel attribution, third-party methods) are registered in
:data:`monai_kdx.registry.EXPLAINERS` and built by name with :func:`build_explainer`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from monai_kdx.networks import num_classes_of, spatial_dims_of, unwrap_network

__all__ = [
    "Explainer",
    "Target",
    "build_explainer",
    "check_inputs",
    "check_target_range",
    "explain",
    "resolve_targets",
    "restore_mode",
]

Target = int | torch.Tensor | None


def check_inputs(network: nn.Module, inputs: torch.Tensor) -> None:
    """Raise a clear error when ``inputs`` cannot be explained by ``network``.

    Args:
        network: a classifier (2D or 3D convolutions).
        inputs: (B, C, H, W) or (B, C, H, W, D).

    Raises:
        TypeError: ``inputs`` is not a floating-point tensor.
        ValueError: ``inputs`` is empty, its spatial dimensionality differs from the network's,
            or it holds NaN or infinite values.
    """
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
        raise TypeError(f"inputs must be a floating-point tensor, got {type(inputs).__name__}.")
    dims = spatial_dims_of(network)
    if dims is not None and inputs.ndim != dims + 2:
        raise ValueError(
            f"inputs of shape {tuple(inputs.shape)} have {inputs.ndim - 2} spatial dimensions but "
            f"{type(unwrap_network(network)).__name__} uses {dims}D convolutions: expected "
            f"(B, C, {', '.join('HWD'[:dims])})."
        )
    if inputs.numel() == 0:
        raise ValueError(f"inputs of shape {tuple(inputs.shape)} are empty.")
    if not torch.isfinite(inputs).all():
        raise ValueError("inputs contain NaN or infinite values.")


def resolve_targets(target: Target, logits: torch.Tensor) -> torch.Tensor:
    """Per-sample class indices: ``None`` → each sample's own argmax, an int → the same class for all,
    a tensor of B ints → one class per sample.

    Args:
        target: see above.
        logits: (B, num_classes) network output.

    Returns:
        (B,) long tensor on ``logits.device``.

    Raises:
        ValueError: a class index out of range, or a target tensor of the wrong length.
    """
    batch, num_classes = logits.shape[0], logits.shape[-1]
    if target is None:
        return logits.detach().argmax(dim=-1)
    targets = torch.as_tensor(target, device=logits.device).long().reshape(-1)
    if targets.numel() == 1:
        targets = targets.expand(batch)
    if targets.numel() != batch:
        raise ValueError(f"target has {targets.numel()} entries for a batch of {batch}.")
    if ((targets < 0) | (targets >= num_classes)).any():
        raise ValueError(f"class index {targets.tolist()} out of range for a network with {num_classes} classes.")
    return targets


def check_target_range(network: nn.Module, target: Target, batch_size: int | None = None) -> None:
    """Reject class indices outside the network's classifier head, or a target tensor whose length
    is neither 1 nor ``batch_size``, before any forward pass."""
    if target is None:
        return
    targets = torch.as_tensor(target).reshape(-1)
    if batch_size is not None and targets.numel() not in (1, batch_size):
        raise ValueError(f"target has {targets.numel()} entries for a batch of {batch_size}.")
    num_classes = num_classes_of(network)
    if num_classes is None:
        return
    if ((targets < 0) | (targets >= num_classes)).any():
        raise ValueError(f"class index {targets.tolist()} out of range for a network with {num_classes} classes.")


@contextlib.contextmanager
def restore_mode(network: nn.Module, training: bool = False) -> Iterator[nn.Module]:
    """Put ``network`` in train (``training=True``) or eval mode for the block, then restore every
    submodule's own mode (so a frozen BatchNorm inside a training model stays frozen)."""
    modes = [(module, module.training) for module in network.modules()]
    network.train(training)
    try:
        yield network
    finally:
        for module, mode in modes:
            module.training = mode


class Explainer:
    """Base of all explainers: ``attribute(inputs, target)`` returns one map per sample.

    Subclasses implement :meth:`_attribute`; the base checks the inputs and the target range first,
    so bad input fails before any work.

    Args:
        network: a 2D or 3D classifier returning (B, num_classes) logits.
    """

    def __init__(self, network: nn.Module) -> None:
        if not isinstance(network, nn.Module):
            raise TypeError(f"network must be a torch.nn.Module, got {type(network).__name__}.")
        self.network = network

    def attribute(self, inputs: torch.Tensor, target: Target = None, **kwargs: Any) -> torch.Tensor:
        """Explain ``inputs`` for ``target``.

        Args:
            inputs: (B, C, H, W) or (B, C, H, W, D).
            target: ``None`` (each sample's predicted class), an int, or a (B,) tensor of ints.

        Returns:
            (B, 1, H, W) or (B, 1, H, W, D) map ((B, C, …) for explainers built with
            ``reduce_channels=False``).
        """
        check_inputs(self.network, inputs)
        check_target_range(self.network, target, inputs.shape[0])
        return self._attribute(inputs, target, **kwargs)

    __call__ = attribute

    def _attribute(self, inputs: torch.Tensor, target: Target, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError


def build_explainer(method: str, network: nn.Module, **options: Any) -> Explainer:
    """Build the explainer registered as ``method`` (see ``EXPLAINERS.names()``) for ``network``."""
    from monai_kdx.registry import EXPLAINERS

    return EXPLAINERS.get(method)(network, **options)


def explain(
    network: nn.Module, inputs: torch.Tensor, method: str = "gradcam", target: Target = None, **options: Any
) -> torch.Tensor:
    """One-call form: ``build_explainer(method, network, **options).attribute(inputs, target)``."""
    return build_explainer(method, network, **options).attribute(inputs, target)
