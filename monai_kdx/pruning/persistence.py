"""Saving and loading pruned networks without pickled modules, and without running anything the file names.

A pruned network's classes are ordinary (MONAI's ``DenseNet``, ``ResNet``, the students), only with
fewer channels, so the file stores an architecture spec instead of pickled modules:

- ``builder``: the network spec ``{"network": <registered name>, **arguments}`` of the *unpruned* network
  (:mod:`monai_kdx.networks.builders`);
- ``modules``: for every resized layer, its constructor-relevant widths (convolutions: ``in_channels``,
  ``out_channels``, ``groups``; batch/group/layer norms: ``num_features``, ``num_channels``,
  ``normalized_shape``; linear layers: ``in_features``, ``out_features``);
- ``state_dict``: the pruned weights.

:func:`load_pruned` checks the spec against the allow-list of registered network builders (an unregistered name,
an unknown argument or a value out of range is refused before anything is built), builds the unpruned network,
shrinks each listed layer to the saved widths (only the width attributes of its layer type, each at most the
unpruned width) and loads the weights. The file is a dict of tensors and plain data: it loads with
``torch.load(path, weights_only=True)``. Bundles load it with
``{"_target_": "monai_kdx.pruning.load_pruned", "path": "..."}``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from monai_kdx.networks import build_network, check_network_spec, network_spec, set_network_spec, unwrap_network

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
    """Save a (pruned) network as network spec + layer widths + weights, atomically (temp file + ``os.replace``).

    Args:
        network: the network (DDP/DataParallel unwrapped).
        path: the file to write (its folder is created).
        builder: the network spec that builds the unpruned network, e.g. ``{"network": "DenseNet121",
            "spatial_dims": 3, "in_channels": 1, "out_channels": 4}``; default: the spec recorded on the network
            (:func:`~monai_kdx.networks.build_network` and :func:`~monai_kdx.pruning.prune_by_relevance` record it).
        metadata: plain data stored alongside (e.g. ratio, method, metrics).

    Returns:
        The path written.

    Raises:
        ValueError: no spec given or recorded, or a spec the network registry refuses (names the argument).
        KeyError: a spec naming an unregistered network.
        TypeError: metadata that is not plain data.
    """
    model = unwrap_network(network)
    spec = builder if builder is not None else network_spec(model)
    if spec is None:
        raise ValueError(
            "save_pruned needs builder={'network': <registered name>, **arguments} to rebuild the network's "
            "architecture (networks from monai_kdx.networks.build_network carry it)."
        )
    spec = check_network_spec(spec)
    if metadata is not None:
        try:
            json.dumps(dict(metadata))
        except (TypeError, ValueError) as error:
            raise TypeError(f"metadata must be plain data (numbers, strings, lists, dicts): {error}") from error
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


def _shrink(model: nn.Module, spec: Any, path: str) -> None:
    """Resize the layers listed in a file's ``modules`` to their saved widths, checking every entry first."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"{path!r}: 'modules' must map layer paths to widths, got {type(spec).__name__}.")
    modules = dict(model.named_modules())
    changes = []
    for layer, entry in spec.items():
        module = modules.get(layer) if isinstance(layer, str) else None
        kind = entry.get("type") if isinstance(entry, Mapping) else None
        if module is None or type(module).__name__ != kind:
            found = "missing" if module is None else type(module).__name__
            raise ValueError(f"{path!r}: layer {layer!r}: the file has a {kind}, the built network {found}.")
        allowed = next(names for cls, names in _ATTRIBUTES if isinstance(module, cls))
        for name, value in entry.items():
            if name == "type":
                continue
            if name not in allowed:
                raise ValueError(f"{path!r}: layer {layer!r}: {name!r} is not a width of a {kind} ({list(allowed)}).")
            current = getattr(module, name)
            values = list(value) if isinstance(value, (list, tuple)) else [value]
            limits = list(current) if isinstance(current, tuple) else [current]
            if len(values) != len(limits) or not all(
                isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= limit
                for v, limit in zip(values, limits, strict=False)
            ):
                raise ValueError(
                    f"{path!r}: layer {layer!r}: {name} = {value!r} is not a pruned width of {current!r} "
                    "(positive integers, at most the unpruned width)."
                )
            changes.append((module, name, tuple(values) if isinstance(current, tuple) else values[0]))
    for module, name, value in changes:
        setattr(module, name, value)


def _resize_tensors(model: nn.Module, state: Mapping[str, Any], path: str) -> None:
    """Replace the parameters and buffers that the pruned weights shrank, by empty tensors of the saved shapes."""
    modules = dict(model.named_modules())
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(f"{path!r}: the state dict holds a {type(value).__name__} under {key!r}, not a tensor.")
        prefix, _, name = key.rpartition(".")
        module = modules.get(prefix)
        if module is None:
            continue  # load_state_dict reports it
        for store in (module._parameters, module._buffers):
            old = store.get(name)
            if old is None or old.shape == value.shape:
                continue
            if value.ndim != old.ndim or any(new > was for new, was in zip(value.shape, old.shape, strict=True)):
                raise ValueError(
                    f"{path!r}: {key!r} has shape {tuple(value.shape)}, larger than the unpruned {tuple(old.shape)}."
                )
            empty = torch.empty(value.shape, dtype=old.dtype, device=old.device)
            store[name] = nn.Parameter(empty, requires_grad=old.requires_grad) if store is module._parameters else empty


def load_pruned(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a network saved by :func:`save_pruned` (``weights_only=True``; nothing is unpickled but tensors, and
    only registered network builders are called).

    Args:
        path: the file.
        map_location: where to put the weights.

    Returns:
        The pruned network, in the train/eval mode it was saved in; it carries its network spec.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a readable pruned-network file, lacks an entry, names an argument out of range,
            or does not fit its network (names the file).
        KeyError: the file names a network that is not registered (names the file and the network).
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
    missing = [key for key in ("builder", "modules", "state_dict") if key not in payload]
    if missing:
        raise ValueError(
            f"{path!r} has no {missing} entr{'y' if len(missing) == 1 else 'ies'}; it was not written "
            "by save_pruned or is damaged."
        )
    try:
        spec = check_network_spec(payload["builder"])
    except (KeyError, TypeError, ValueError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        raise type(error)(f"{path!r}: refused network spec: {message}") from None
    model = build_network(spec)
    state = payload["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path!r}: 'state_dict' must be a mapping of tensors, got {type(state).__name__}.")
    _shrink(model, payload["modules"], path)
    _resize_tensors(model, state, path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{path!r} does not fit the network {spec['network']!r}: {error}") from error
    model.to(map_location)
    model.train(bool(payload.get("training", False)))
    return set_network_spec(model, spec)
