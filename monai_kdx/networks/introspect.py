"""What a network expects and predicts, read from its layers (no forward pass)."""

from __future__ import annotations

import torch
from torch import nn

from .capture import unwrap_network

__all__ = ["spatial_dims_of", "num_classes_of", "load_weights"]

_CONVS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}


def spatial_dims_of(network: nn.Module) -> int | None:
    """Spatial dimensionality (1, 2 or 3) of the first convolution, or None without convolutions."""
    for module in unwrap_network(network).modules():
        for conv, dims in _CONVS.items():
            if isinstance(module, conv):
                return dims
    return None


def num_classes_of(network: nn.Module) -> int | None:
    """Output width of the last ``nn.Linear`` (the classifier head), or None without one."""
    linears = [m for m in unwrap_network(network).modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


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
