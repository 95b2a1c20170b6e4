"""What a network expects and predicts, read from its layers (no forward pass)."""

from __future__ import annotations

import torch
from torch import nn

from .capture import unwrap_network

__all__ = [
    "spatial_dims_of",
    "in_channels_of",
    "num_classes_of",
    "check_network_input",
    "load_weights",
    "read_state_dict",
]

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


def read_state_dict(path: str, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The state dict in a file saved by MONAI's ``CheckpointSaver`` (single item or ``{"model": ...}``) or by
    :func:`monai_kdx.pruning.save_pruned` (its ``"state_dict"``), read with ``weights_only=True``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is truncated, corrupt or not a PyTorch checkpoint, or holds no state dict (one line
            naming the file and the reason).
    """
    import os

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated zip, foreign pickle, empty file, ...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"checkpoint {path!r} is corrupt or not a PyTorch checkpoint ({reason}).") from error
    for key in ("model", "state_dict"):  # CheckpointSaver's {"model": ...}; save_pruned's {"state_dict": ...}
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path!r} holds no state dict of tensors ({type(state).__name__}).")
    return state


def load_weights(network: nn.Module, path: str, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load the state dict of a ``CheckpointSaver`` file (:func:`read_state_dict`) into ``network`` and return
    the network.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file cannot be read (see :func:`read_state_dict`) or its weights do not fit the network
            (one line naming the file, the network and the first mismatch of each kind).
    """
    state = read_state_dict(path, map_location)
    target = unwrap_network(network).state_dict()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    resized = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in target.items()
               if k in state and state[k].shape != v.shape]  # fmt: skip
    if missing or unexpected or resized:
        kinds = (("missing", missing), ("unexpected", unexpected), ("of another shape", resized))
        parts = [f"{len(found)} {what} (first: {found[0]})" for what, found in kinds if found]
        raise ValueError(f"checkpoint {path!r} does not fit {type(network).__name__}: {'; '.join(parts)}.")
    unwrap_network(network).load_state_dict(state)
    return network
