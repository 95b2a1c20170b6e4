"""Networks built from plain config data, through an allow-list.

A network *spec* is plain data naming a registered builder and its arguments::

    {"network": "ShallowCNN", "spatial_dims": 3, "in_channels": 1, "out_channels": 4}

It is what bundle configs declare (``student_def``/``teacher_def``), what :func:`~monai_kdx.pruning.save_pruned`
stores instead of pickled modules, and what the registered MLflow models are rebuilt from. Because such specs are
read back from files, :func:`build_network` only calls builders registered in :data:`NETWORKS` (MONAI's DenseNet
and ResNet families, this package's students, and whatever a caller registers explicitly with
:func:`register_network`), checks every argument's type and range against the builder's declared parameters before
building, and refuses a network whose parameter count exceeds ``max_parameters`` (counted on the ``meta`` device,
without allocating memory). Nothing in a spec can name another callable: an unknown name is refused with the
registered names listed.

The key ``"_target_"`` is accepted in place of ``"network"`` (the form of files written before), and each MONAI or
package network is also registered under its dotted path (``"monai.networks.nets.DenseNet121"``,
``"monai_kdx.networks.ShallowCNN"``).

Example:
    >>> net = build_network({"network": "DenseNet121", "spatial_dims": 3, "in_channels": 1, "out_channels": 4,
    ...                      "init_features": 16, "growth_rate": 8})
    >>> build_network({"network": "subprocess.run", "args": ["ls"]})
    Traceback (most recent call last):
    KeyError: "unknown network entry 'subprocess.run'. Registered: [...]"
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from monai_kdx.registry import NETWORKS

__all__ = [
    "ArgumentCheck",
    "Choice",
    "Flag",
    "Integer",
    "Integers",
    "Real",
    "NetworkBuilder",
    "MAX_PARAMETERS",
    "SPEC_KEY",
    "register_network",
    "check_network_spec",
    "build_network",
    "load_network",
    "network_spec",
    "set_network_spec",
]

SPEC_KEY = "network"
"""The key of a spec that names the registered builder (``"_target_"`` is accepted as well)."""

MAX_PARAMETERS = 500_000_000
"""Default upper bound of a built network's parameter count (2 GB of float32 weights)."""

_LEGACY_KEY = "_target_"
_SPEC_ATTRIBUTE = "_monai_kdx_network_spec"


class ArgumentCheck:
    """A declared parameter of a registered builder: validates (and normalizes) one plain-data value."""

    def __call__(self, name: str, value: Any) -> Any:
        raise NotImplementedError


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class Integer(ArgumentCheck):
    """An integer in ``[low, high]``."""

    low: int
    high: int

    def __call__(self, name: str, value: Any) -> int:
        if not _is_int(value):
            raise TypeError(f"argument {name!r} must be an integer, got {value!r} ({type(value).__name__}).")
        if not self.low <= int(value) <= self.high:
            raise ValueError(f"argument {name!r} must be in [{self.low}, {self.high}], got {value}.")
        return int(value)


@dataclass(frozen=True)
class Real(ArgumentCheck):
    """A finite real number in ``[low, high]``."""

    low: float
    high: float

    def __call__(self, name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise TypeError(f"argument {name!r} must be a finite number, got {value!r}.")
        if not self.low <= float(value) <= self.high:
            raise ValueError(f"argument {name!r} must be in [{self.low}, {self.high}], got {value}.")
        return float(value)


@dataclass(frozen=True)
class Integers(ArgumentCheck):
    """A list of ``min_len`` to ``max_len`` integers, each in ``[low, high]`` (returned as a tuple)."""

    low: int
    high: int
    min_len: int = 1
    max_len: int = 16

    def __call__(self, name: str, value: Any) -> tuple[int, ...]:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise TypeError(f"argument {name!r} must be a list of integers, got {value!r}.")
        if not self.min_len <= len(value) <= self.max_len:
            raise ValueError(
                f"argument {name!r} must hold {self.min_len} to {self.max_len} integers, got {len(value)}."
            )
        check = Integer(self.low, self.high)
        return tuple(check(f"{name}[{i}]", item) for i, item in enumerate(value))


@dataclass(frozen=True)
class Choice(ArgumentCheck):
    """One of a fixed set of plain values."""

    values: tuple[Any, ...]

    def __call__(self, name: str, value: Any) -> Any:
        if isinstance(value, bool) or value not in self.values or type(value) not in {type(v) for v in self.values}:
            raise ValueError(f"argument {name!r} must be one of {list(self.values)}, got {value!r}.")
        return value


@dataclass(frozen=True)
class Flag(ArgumentCheck):
    """A boolean."""

    def __call__(self, name: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise TypeError(f"argument {name!r} must be true or false, got {value!r}.")
        return value


@dataclass(frozen=True)
class NetworkBuilder:
    """A registered network builder: the callable, its declared parameters and the ones it requires.

    Attributes:
        name: the registered name.
        factory: the callable that builds the ``nn.Module``.
        parameters: parameter name → its check; nothing else may be passed.
        required: the parameters a spec must give.
    """

    name: str
    factory: Callable[..., nn.Module]
    parameters: Mapping[str, ArgumentCheck]
    required: tuple[str, ...] = field(default=())

    def check(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """Validated arguments (normalized: lists become tuples), or an error naming the argument."""
        unknown = sorted(set(arguments) - set(self.parameters))
        if unknown:
            raise ValueError(
                f"network {self.name!r} takes no argument(s) {unknown}; its arguments: {sorted(self.parameters)}."
            )
        missing = [name for name in self.required if name not in arguments]
        if missing:
            raise ValueError(f"network {self.name!r} needs the argument(s) {missing}.")
        try:
            return {name: self.parameters[name](name, value) for name, value in arguments.items()}
        except (TypeError, ValueError) as error:
            raise type(error)(f"network {self.name!r}: {error}") from None


def register_network(
    name: str,
    factory: Callable[..., nn.Module],
    *,
    required: Sequence[str] = (),
    aliases: Sequence[str] = (),
    override: bool = False,
    **parameters: ArgumentCheck,
) -> NetworkBuilder:
    """Allow ``factory`` to be built from specs naming ``name`` (or one of ``aliases``).

    Args:
        name: the name specs use (``{"network": name, ...}``).
        factory: a callable returning an ``nn.Module``; called with keyword arguments only.
        required: parameters a spec must give.
        aliases: other names for the same builder (e.g. its dotted import path).
        override: replace an existing registration of the same name.
        parameters: every accepted keyword argument with its check (:class:`Integer`, :class:`Real`,
            :class:`Integers`, :class:`Choice`, :class:`Flag`); anything not declared is refused.

    Returns:
        The :class:`NetworkBuilder`.

    Example:
        >>> register_network("TinyNet", TinyNet, required=("out_channels",), out_channels=Integer(1, 1000))
    """
    for key, check in parameters.items():
        if not isinstance(check, ArgumentCheck):
            raise TypeError(f"parameter {key!r} of {name!r} needs an ArgumentCheck, got {type(check).__name__}.")
    builder = NetworkBuilder(name, factory, dict(parameters), tuple(required))
    for key in (name, *aliases):
        NETWORKS.register(key, builder, override=override)
    return builder


def check_network_spec(spec: Any, max_parameters: int | None = MAX_PARAMETERS) -> dict[str, Any]:
    """Validate a network spec without building anything that allocates weights.

    Args:
        spec: ``{"network": <registered name>, **arguments}`` (``"_target_"`` accepted for ``"network"``).
        max_parameters: refuse a network with more parameters (counted on the ``meta`` device); None: no bound.

    Returns:
        The canonical spec: ``{"network": <registered name as given>, **validated arguments}``, plain data.

    Raises:
        TypeError: a spec that is not a mapping naming a network, an argument of the wrong type.
        KeyError: a name that is not registered (the registered ones are listed).
        ValueError: an unknown or missing argument, a value out of range, too many parameters.
    """
    builder, arguments = _resolve(spec)
    if max_parameters is not None:
        with torch.device("meta"):
            count = sum(p.numel() for p in builder.factory(**arguments).parameters())
        if count > max_parameters:
            raise ValueError(
                f"network {builder.name!r} with {_plain_arguments(arguments)} would have {count:,} parameters, "
                f"more than the limit of {max_parameters:,}."
            )
    return {SPEC_KEY: _name_of(spec), **_plain_arguments(arguments)}


def build_network(spec: Any, max_parameters: int | None = MAX_PARAMETERS) -> nn.Module:
    """Build the network a spec describes, after :func:`check_network_spec`.

    Args:
        spec: ``{"network": <registered name>, **arguments}``.
        max_parameters: see :func:`check_network_spec`.

    Returns:
        The new ``nn.Module`` (on the CPU, in training mode).
    """
    canonical = check_network_spec(spec, max_parameters)
    builder, arguments = _resolve(spec)
    network = builder.factory(**arguments)
    if not isinstance(network, nn.Module):
        raise TypeError(f"network builder {builder.name!r} returned a {type(network).__name__}, not an nn.Module.")
    return set_network_spec(network, canonical)


def load_network(
    spec: Any, checkpoint: str | None = None, map_location: Any = "cpu", max_parameters: int | None = MAX_PARAMETERS
) -> nn.Module:
    """:func:`build_network`, then the weights of a state-dict checkpoint when one is given (``None``: the fresh
    network), loaded with ``weights_only=True`` (:func:`monai_kdx.networks.load_weights`).

    Bundles build every network with it, the path being a plain config value::

        network: "$monai_kdx.networks.load_network(@network_spec, @start_checkpoint).to(@device)"
    """
    network = build_network(spec, max_parameters)
    if checkpoint is None:
        return network
    from .introspect import load_weights

    return load_weights(network, checkpoint, map_location=map_location)


def network_spec(network: nn.Module) -> dict[str, Any] | None:
    """The spec a network was built from (:func:`build_network`, :func:`set_network_spec`), or None.

    The spec travels with the module (``copy.deepcopy`` keeps it, e.g. through pruning), so a pruned network can be
    saved without naming its architecture again. DDP/DataParallel wrappers are looked through.
    """
    from .capture import unwrap_network

    spec = getattr(unwrap_network(network), _SPEC_ATTRIBUTE, None)
    return None if spec is None else dict(spec)


def set_network_spec(network: nn.Module, spec: Mapping[str, Any], check: bool = False) -> nn.Module:
    """Record the spec that builds ``network``'s (unpruned) architecture on it, and return the network.

    Args:
        network: the module (a DDP/DataParallel wrapper is looked through).
        spec: a network spec.
        check: validate the spec first (:func:`check_network_spec`).
    """
    from .capture import unwrap_network

    canonical = check_network_spec(spec) if check else dict(spec)
    object.__setattr__(unwrap_network(network), _SPEC_ATTRIBUTE, canonical)
    return network


def _name_of(spec: Any) -> str:
    if not isinstance(spec, Mapping):
        raise TypeError(f"a network spec must be a mapping like {{'network': 'ShallowCNN', ...}}, got {spec!r}.")
    names = [spec[key] for key in (SPEC_KEY, _LEGACY_KEY) if key in spec]
    if len(names) != 1 or not isinstance(names[0], str):
        raise TypeError(
            f"a network spec names its builder under {SPEC_KEY!r} (a string), e.g. {{'network': 'ShallowCNN', ...}}; "
            f"got keys {sorted(map(str, spec))}."
        )
    return names[0]


def _resolve(spec: Any) -> tuple[NetworkBuilder, dict[str, Any]]:
    name = _name_of(spec)
    builder = NETWORKS.get(name)  # KeyError listing the registered names
    arguments = {str(key): value for key, value in spec.items() if key not in (SPEC_KEY, _LEGACY_KEY)}
    return builder, builder.check(arguments)


def _plain_arguments(arguments: Mapping[str, Any]) -> dict[str, Any]:
    return {key: list(value) if isinstance(value, tuple) else value for key, value in arguments.items()}


# ---------------------------------------------------------------------------------------------------------------
# built-in builders: MONAI's DenseNet and ResNet families and the package's students
# ---------------------------------------------------------------------------------------------------------------
WIDTH = Integer(1, 4096)
CLASSES = Integer(1, 100_000)
IN_CHANNELS = Integer(1, 1024)
SPATIAL_DIMS = Choice((1, 2, 3))


def _register_builtins() -> None:
    from monai.networks import nets

    from .students import NORMS, ShallowCNN, densenet_student, resnet_student

    dense = {
        "spatial_dims": SPATIAL_DIMS,
        "in_channels": IN_CHANNELS,
        "out_channels": CLASSES,
        "init_features": WIDTH,
        "growth_rate": Integer(1, 1024),
        "block_config": Integers(1, 128, 1, 8),
        "bn_size": Integer(1, 32),
        "dropout_prob": Real(0.0, 1.0),
    }
    dense_required = ("spatial_dims", "in_channels", "out_channels")
    register_network(
        "DenseNet", nets.DenseNet, required=dense_required, aliases=("monai.networks.nets.DenseNet",), **dense
    )
    for variant in ("DenseNet121", "DenseNet169", "DenseNet201", "DenseNet264"):
        register_network(
            variant,
            getattr(nets, variant),
            required=dense_required,
            aliases=(f"monai.networks.nets.{variant}",),
            **dense,
        )
    resnet = {
        "spatial_dims": SPATIAL_DIMS,
        "n_input_channels": IN_CHANNELS,
        "num_classes": CLASSES,
        "conv1_t_size": Integer(1, 15),
        "conv1_t_stride": Integer(1, 4),
        "no_max_pool": Flag(),
        "shortcut_type": Choice(("A", "B")),
        "widen_factor": Real(0.01, 16.0),
        "feed_forward": Flag(),
        "bias_downsample": Flag(),
    }
    register_network(
        "ResNet",
        nets.ResNet,
        required=("block", "layers", "block_inplanes"),
        aliases=("monai.networks.nets.ResNet",),
        block=Choice(("basic", "bottleneck")),
        layers=Integers(0, 64, 4, 4),
        block_inplanes=Integers(1, 4096, 4, 4),
        **resnet,
    )
    for depth in (10, 18, 34, 50, 101):
        register_network(
            f"resnet{depth}", getattr(nets, f"resnet{depth}"), aliases=(f"monai.networks.nets.resnet{depth}",), **resnet
        )
    register_network(
        "ShallowCNN",
        ShallowCNN,
        required=("spatial_dims", "in_channels", "out_channels"),
        aliases=("monai_kdx.networks.ShallowCNN", "monai_kdx.networks.students.ShallowCNN"),
        spatial_dims=Choice((2, 3)),
        in_channels=IN_CHANNELS,
        out_channels=CLASSES,
        channels=Integers(1, 4096, 1, 12),
        hidden=Integer(0, 4096),
        dropout=Real(0.0, 1.0),
        norm=Choice(NORMS),
        stem_stride=Integer(1, 8),
    )
    register_network(
        "densenet_student",
        densenet_student,
        required=dense_required,
        aliases=("monai_kdx.networks.densenet_student", "monai_kdx.networks.students.densenet_student"),
        **{key: dense[key] for key in ("spatial_dims", "in_channels", "out_channels", "init_features", "growth_rate")},
        block_config=Integers(1, 128, 1, 8),
    )
    register_network(
        "resnet_student",
        resnet_student,
        required=("spatial_dims", "in_channels", "out_channels"),
        aliases=("monai_kdx.networks.resnet_student", "monai_kdx.networks.students.resnet_student"),
        spatial_dims=SPATIAL_DIMS,
        in_channels=IN_CHANNELS,
        out_channels=CLASSES,
        layers=Integers(0, 64, 4, 4),
        block_inplanes=Integers(1, 4096, 4, 4),
    )


_register_builtins()
