"""What every explainer shares: one ``attribute(inputs, target)`` verb and input checks before any work (targets
are resolved per sample by :func:`monai_kdx.networks.resolve_targets`; modes restored by
:func:`monai_kdx.networks.restore_mode`).

Explainers (CAM modes, pixel attribution, third-party methods) are registered in
:data:`monai_kdx.registry.EXPLAINERS` and built by name with :func:`build_explainer`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from monai_kdx.networks import Target, check_network_input, class_indices, num_classes_of

__all__ = ["Explainer", "build_explainer", "check_inputs", "check_target_range", "explain"]


def check_inputs(network: nn.Module, inputs: torch.Tensor) -> None:
    """Raise a clear error when ``inputs`` cannot be explained by ``network`` (dtype, dimensionality, channels,
    emptiness, NaN; see :func:`monai_kdx.networks.check_network_input`).

    Args:
        network: a classifier (2D or 3D convolutions).
        inputs: (B, C, H, W) or (B, C, H, W, D).
    """
    check_network_input(network, inputs, "inputs")


def check_target_range(network: nn.Module, target: Target, batch_size: int | None = None) -> None:
    """Reject class indices outside the network's classifier head, fractional or non-numeric targets, or a target
    whose length is neither 1 nor ``batch_size``, before any forward pass (see
    :func:`monai_kdx.networks.class_indices`)."""
    if target is not None:
        class_indices(target, batch_size, num_classes_of(network), broadcast=True, name="target")


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
