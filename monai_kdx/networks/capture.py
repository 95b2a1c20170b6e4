"""Feature capture by module path: the one utility that distillation, explanations and pruning use
to read a network's intermediate tensors.

Hooks live only inside a ``with`` block, the network is never modified (no attributes set, no
``requires_grad`` or mode changes, no ``retain_grad``), and captured tensors stay in the autograd
graph unless ``detach=True``, so ``torch.autograd.grad(score, capture[name], create_graph=True)``
works for differentiable explanations inside losses.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["FeatureCapture", "unwrap_network", "resolve_module", "module_paths"]

_WRAPPERS = (nn.parallel.DistributedDataParallel, nn.DataParallel)


def unwrap_network(network: nn.Module) -> nn.Module:
    """Return the model inside a ``DistributedDataParallel``/``DataParallel`` wrapper (or the model)."""
    while isinstance(network, _WRAPPERS):
        network = network.module
    return network


def module_paths(network: nn.Module, max_depth: int | None = None) -> list[str]:
    """Dotted paths of the network's submodules (of the unwrapped model), in definition order.

    Args:
        network: a model, possibly wrapped in DDP/DataParallel.
        max_depth: keep only paths with at most this many dotted parts.
    """
    names = [name for name, _ in unwrap_network(network).named_modules() if name]
    if max_depth is not None:
        names = [name for name in names if name.count(".") < max_depth]
    return names


def resolve_module(network: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted ``path``; a DDP ``module.`` prefix is accepted and ignored.

    Raises:
        ValueError: the path names no submodule; the message lists close matches and the stages.
    """
    model = unwrap_network(network)
    modules = dict(model.named_modules())
    key = path
    if key not in modules and key.startswith("module.") and key[len("module.") :] in modules:
        key = key[len("module.") :]
    if key in modules and key:
        return modules[key]
    close = difflib.get_close_matches(path, [name for name in modules if name], n=5, cutoff=0.5)
    hint = f" Close matches: {close}." if close else ""
    raise ValueError(
        f"{type(model).__name__} has no submodule {path!r}.{hint} "
        f"Valid paths include: {module_paths(model, max_depth=2)}."
    )


class FeatureCapture(Mapping[str, Any]):
    """Capture the outputs (or inputs) of submodules, addressed by dotted path, during forwards.

    Used as a context manager; it is a read-only mapping from path to the captured tensor (for a
    convolutional layer, shape (B, C, H, W) in 2D or (B, C, H, W, D) in 3D). A module called more
    than once in one forward keeps its last call, or, with ``every_call=True``, the list of all its calls' tensors.
    Paths are validated at construction.

    Args:
        network: the model (a DDP/DataParallel wrapper is unwrapped; ``module.`` prefixes accepted).
        layers: dotted module paths, e.g. ``["features.denseblock1", "features.transition2.conv"]`` (an
            empty list captures nothing).
        capture: ``"output"`` for what the module returns, ``"input"`` for its first positional input.
        detach: store detached tensors (cheaper when no gradient is needed through them).
        every_call: keep a list of every call's tensor per path (a module reused within the forward, e.g. a shared
            activation) instead of the last one.

    Raises:
        ValueError: an unknown path (with close matches) or a bad ``capture``.

    Example:
        >>> with FeatureCapture(net, ["features.denseblock2", "features.denseblock4"]) as feats:
        ...     logits = net(x)                                  # x: (B, 1, 64, 64, 64)
        >>> grads = torch.autograd.grad(logits[:, 1].sum(), feats["features.denseblock4"])
    """

    def __init__(
        self,
        network: nn.Module,
        layers: str | Sequence[str],
        capture: str = "output",
        detach: bool = False,
        every_call: bool = False,
    ) -> None:
        if capture not in ("output", "input"):
            raise ValueError(f"capture must be 'output' or 'input', got {capture!r}.")
        self.layers = [layers] if isinstance(layers, str) else list(layers)
        self.modules = {path: resolve_module(network, path) for path in self.layers}
        self.capture = capture
        self.detach = detach
        self.every_call = every_call
        self._features: dict[str, Any] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, path: str):
        def store(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            value = output if self.capture == "output" else inputs[0]
            if self.detach and isinstance(value, torch.Tensor):
                value = value.detach()
            if self.every_call:
                self._features.setdefault(path, []).append(value)
            else:
                self._features[path] = value

        return store

    def __enter__(self) -> FeatureCapture:
        if self._handles:
            raise RuntimeError("this FeatureCapture is already active; use a new one for a nested capture.")
        self._features.clear()
        try:
            for path, module in self.modules.items():
                self._handles.append(module.register_forward_hook(self._hook(path)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook this capture registered (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def clear(self) -> None:
        """Forget captured tensors (e.g. between iterations), keeping the hooks."""
        self._features.clear()

    def __getitem__(self, path: str) -> Any:
        if path not in self._features:
            if path in self.modules:
                raise KeyError(f"{path!r} has not run yet: call the network inside the `with` block.")
            raise KeyError(f"{path!r} is not captured; captured layers: {self.layers}.")
        return self._features[path]

    def __iter__(self) -> Iterator[str]:
        return iter(self._features)

    def __len__(self) -> int:
        return len(self._features)
