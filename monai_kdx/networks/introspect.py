"""What a network expects and predicts, read from its layers (no forward pass)."""

from __future__ import annotations

import torch
from torch import nn

from .capture import unwrap_network

__all__ = ["spatial_dims_of", "in_channels_of", "num_classes_of", "check_network_input", "load_weights"]

_CONVS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}


def spatial_dims_of(network: nn.Module) -> int | None:
    """Spatial dimensionality (1, 2 or 3) of the first convolution, or None without convolutions."""
    for module in unwrap_network(network).modules():
        for conv, dims in _CONVS.items():
            if isinstance(module, conv):
                return dims
    return None


def in_channels_of(network: nn.Module) -> int | None:
    """Input channels of the first convolution (or linear layer), or None without either."""
    for module in unwrap_network(network).modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return module.in_channels
        if isinstance(module, nn.Linear):
            return module.in_features
    return None


def num_classes_of(network: nn.Module) -> int | None:
    """Output width of the last ``nn.Linear`` (the classifier head), or None without one."""
    linears = [m for m in unwrap_network(network).modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


def check_network_input(network: nn.Module, inputs: object, name: str = "inputs") -> None:
    """Raise one clear error, naming ``name``, when ``inputs`` cannot go through ``network``, before any work.

    Args:
        network: a 2D or 3D network (convolutions tell its dimensionality and input channels).
        inputs: (B, C, H, W) or (B, C, H, W, D).
        name: what the inputs are called in the message (``"inputs"``, ``"calibration images"``, ...).

    Raises:
        TypeError: not a floating-point tensor, or not of the network's floating dtype (outside autocast).
        ValueError: empty, another spatial dimensionality or channel count than the network's, NaN or infinite
            values.
    """
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
        found = type(inputs).__name__ + (f" of {inputs.dtype}" if isinstance(inputs, torch.Tensor) else "")
        raise TypeError(f"{name} must be a floating-point tensor, got {found}.")
    model = unwrap_network(network)
    kind = type(model).__name__
    weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    if weight is not None and weight.dtype != inputs.dtype and not torch.is_autocast_enabled(inputs.device.type):
        raise TypeError(
            f"{name} are {inputs.dtype} but the weights of {kind} are {weight.dtype}: cast them "
            f"(e.g. x.to({weight.dtype})) or run under torch.autocast."
        )
    dims = spatial_dims_of(model)
    if dims is not None and inputs.ndim != dims + 2:
        raise ValueError(
            f"{name} of shape {tuple(inputs.shape)} have {inputs.ndim - 2} spatial dimensions but {kind} uses "
            f"{dims}D convolutions: expected (B, C, {', '.join('HWD'[:dims])})."
        )
    channels = in_channels_of(model)
    if dims is not None and channels is not None and inputs.shape[1] != channels:
        raise ValueError(
            f"{name} of shape {tuple(inputs.shape)} have {inputs.shape[1]} channel(s) but {kind} expects {channels}."
        )
    if inputs.numel() == 0:
        raise ValueError(f"{name} of shape {tuple(inputs.shape)} are empty.")
    if not torch.isfinite(inputs).all():
        raise ValueError(f"{name} contain NaN or infinite values.")


def load_weights(network: nn.Module, path: str, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a state dict saved by MONAI's ``CheckpointSaver`` (single item or ``{"model": ...}``)
    into ``network`` with ``weights_only=True``, and return the network.

    Raises:
        FileNotFoundError: no file at ``path``.
        RuntimeError: the weights do not fit the network (names the file).
    """
    import os

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}.")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    try:
        unwrap_network(network).load_state_dict(state)
    except RuntimeError as error:
        raise RuntimeError(f"checkpoint {path!r} does not fit {type(network).__name__}: {error}") from error
    return network
