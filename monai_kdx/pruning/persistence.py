"""Saving and loading pruned networks without pickled modules.

A pruned network's classes are ordinary (MONAI's ``DenseNet``, ``ResNet``, the students), only with
fewer channels, so the file stores an architecture spec instead of pickled modules:

- ``builder``: ``{"_target_": "dotted.path", **kwargs}``, the bundle-style call that builds the
  *unpruned* network (the module tree and forward code);
- ``modules``: for every resized layer, its constructor-relevant widths (convolutions: ``in_channels``,
  ``out_channels``, ``groups``; batch/group/layer norms: ``num_features``, ``num_channels``,
  ``normalized_shape``; linear layers: ``in_features``, ``out_features``);
- ``state_dict``: the pruned weights.

:func:`load_pruned` builds the unpruned network, resizes each layer in place to the saved widths and
loads the weights. The file is a dict of tensors and plain data: it loads with
``torch.load(path, weights_only=True)``. Bundles load it with
``{"_target_": "monai_kdx.pruning.load_pruned", "path": "..."}``.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from monai_kdx.networks import unwrap_network

from .prune import BUILDER_ATTRIBUTE, _check_builder

__all__ = ["FORMAT", "save_pruned", "load_pruned", "architecture_spec"]

FORMAT = "monai_kdx.pruned/1"

_ATTRIBUTES: tuple[tuple[type, tuple[str, ...]], ...] = (
    (nn.modules.conv._ConvNd, ("in_channels", "out_channels", "groups")),
    (nn.modules.batchnorm._NormBase, ("num_features",)),
    (nn.GroupNorm, ("num_groups", "num_channels")),
    (nn.LayerNorm, ("normalized_shape",)),
    (nn.Linear, ("in_features", "out_features")),
)


def architecture_spec(network: nn.Module) -> dict[str, dict[str, Any]]:
    """Layer path → ``{"type": class name, width attributes...}`` for every conv, norm and linear layer."""
    spec = {}
    for path, module in unwrap_network(network).named_modules():
        for kind, names in _ATTRIBUTES:
            if isinstance(module, kind):
                entry: dict[str, Any] = {"type": type(module).__name__}
                for name in names:
                    value = getattr(module, name)
                    entry[name] = list(value) if isinstance(value, tuple) else value
                spec[path] = entry
                break
    return spec


def save_pruned(
    network: nn.Module,
    path: str | os.PathLike,
    builder: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> str:
    """Save a (pruned) network as builder spec + layer widths + weights, atomically (temp file + ``os.replace``).

    Args:
        network: the network (DDP/DataParallel unwrapped).
        path: the file to write (its folder is created).
        builder: ``{"_target_": "monai.networks.nets.DenseNet121", "spatial_dims": 3, ...}``, the call that builds
            the unpruned network; default: the one :func:`~monai_kdx.pruning.prune_by_relevance` recorded.
        metadata: plain data stored alongside (e.g. ratio, method, metrics).

    Returns:
        The path written.

    Raises:
        ValueError: no builder given or recorded.
        TypeError: a builder or metadata that is not plain data.
    """
    model = unwrap_network(network)
    spec = _check_builder(builder if builder is not None else getattr(model, BUILDER_ATTRIBUTE, None))
    if spec is None:
        raise ValueError(
            "save_pruned needs builder={'_target_': 'dotted.path', **kwargs} to rebuild the network's architecture "
            "(prune_by_relevance(..., builder=...) records it on the pruned network)."
        )
    if metadata is not None:
        _check_builder({"_target_": "metadata", **dict(metadata)})  # plain-data check
    payload = {
        "format": FORMAT,
        "builder": spec,
        "modules": architecture_spec(model),
        "state_dict": {key: value.detach().cpu().clone() for key, value in model.state_dict().items()},
        "training": bool(model.training),
        "metadata": dict(metadata or {}),
    }
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(payload, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return path


def _locate(target: str) -> Any:
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(f"cannot import {target!r}")


def _resize(model: nn.Module, spec: Mapping[str, Mapping[str, Any]], state: Mapping[str, torch.Tensor]) -> None:
    modules = dict(model.named_modules())
    for path, entry in spec.items():
        module = modules.get(path)
        if module is None or type(module).__name__ != entry.get("type"):
            found = "missing" if module is None else type(module).__name__
            raise ValueError(f"layer {path!r}: the file has a {entry.get('type')}, the built network {found}.")
        for name, value in entry.items():
            if name != "type":
                setattr(module, name, tuple(value) if isinstance(value, list) else value)
    for key, value in state.items():
        path, _, name = key.rpartition(".")
        module = modules.get(path)
        if module is None:
            continue  # load_state_dict reports it
        if name in module._parameters and module._parameters[name] is not None:
            old = module._parameters[name]
            if old.shape != value.shape:
                module._parameters[name] = nn.Parameter(
                    torch.empty(value.shape, dtype=old.dtype, device=old.device), requires_grad=old.requires_grad
                )
        elif name in module._buffers and module._buffers[name] is not None:
            old = module._buffers[name]
            if old.shape != value.shape:
                module._buffers[name] = torch.empty(value.shape, dtype=old.dtype, device=old.device)


def load_pruned(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a network saved by :func:`save_pruned` (``weights_only=True``; nothing is unpickled but tensors).

    Args:
        path: the file.
        map_location: where to put the weights.

    Returns:
        The pruned network, in the train/eval mode it was saved in.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a readable pruned-network file, or does not fit its builder (names the file).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no pruned network file at {path!r}.")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise ValueError(
            f"{path!r} is not a readable pruned-network file (corrupt or not written by save_pruned): "
            f"{type(error).__name__}: {error}"
        ) from error
    if not isinstance(payload, Mapping) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, Mapping) else type(payload).__name__
        raise ValueError(f"{path!r} is not a {FORMAT!r} file (format: {found!r}); was it written by save_pruned?")
    builder = dict(payload["builder"])
    target = builder.pop("_target_")
    try:
        model = _locate(target)(**builder)
    except Exception as error:
        raise ValueError(f"{path!r}: cannot build the network {target!r}: {type(error).__name__}: {error}") from error
    if not isinstance(model, nn.Module):
        raise ValueError(f"{path!r}: builder {target!r} returned a {type(model).__name__}, not an nn.Module.")
    state = payload["state_dict"]
    try:
        _resize(model, payload["modules"], state)
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"{path!r} does not fit the network built by {target!r}: {error}") from error
    model.to(map_location)
    model.train(bool(payload.get("training", False)))
    setattr(model, BUILDER_ATTRIBUTE, {"_target_": target, **builder})
    return model
