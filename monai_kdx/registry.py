"""Named registries of pluggable methods.

Every capability that offers a choice of method (dataset kinds, network builders, explainers,
relevance methods, distillation losses, saliency losses) looks the method up by name in one of the registries below.
Built-in methods register themselves when their module is imported; the registry imports those
modules lazily on the first lookup, so ``import monai_kdx.registry`` stays cheap.

Third-party packages add methods through the entry-point group ``monai_kdx.plugins``. An entry
point names a module (whose import runs ``@REGISTRY.register`` decorators) or a callable (called
once, with no arguments, to register). In ``pyproject.toml``::

    [project.entry-points."monai_kdx.plugins"]
    my_methods = "my_package.kdx_plugin"

Example:
    >>> from monai_kdx.registry import EXPLAINERS
    >>> @EXPLAINERS.register("my-cam")
    ... class MyCAM: ...
    >>> EXPLAINERS.get("my-cam") is MyCAM
    True
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import inspect
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = [
    "PLUGIN_GROUP",
    "Registry",
    "REGISTRIES",
    "DATASETS",
    "NETWORKS",
    "EXPLAINERS",
    "RELEVANCE_METHODS",
    "DISTILLATION_LOSSES",
    "SALIENCY_LOSSES",
    "load_plugins",
]

PLUGIN_GROUP = "monai_kdx.plugins"

_plugin_lock = threading.RLock()
_plugins_loaded = False
_plugin_errors: dict[str, str] = {}


class Registry:
    """A mapping from names to registered objects (classes or functions).

    Args:
        name: the registry's name, used in error messages.
        builtin_modules: modules that register built-in entries; imported on the first lookup.

    Raises:
        KeyError: from :meth:`get`, naming the unknown entry and listing the registered ones.
        ValueError: from :meth:`register`, when a name is taken and ``override`` is False.
    """

    def __init__(self, name: str, builtin_modules: Sequence[str] = ()) -> None:
        self.name = name
        self._builtin_modules = tuple(builtin_modules)
        self._builtins_loaded = not self._builtin_modules
        self._entries: dict[str, Any] = {}

    def register(self, name: str | None = None, obj: Any = None, *, override: bool = False) -> Any:
        """Register ``obj`` under ``name``; without ``obj``, return a decorator.

        Args:
            name: the lookup name; defaults to the object's ``__name__``.
            obj: the object to register. Omit it to use ``register`` as a decorator.
            override: replace an existing entry of the same name instead of raising.

        Returns:
            ``obj`` itself (or a decorator that returns the decorated object unchanged).
        """
        if obj is None:
            return lambda target: self.register(name, target, override=override)
        key = name or getattr(obj, "__name__", None)
        if not key or not isinstance(key, str):
            raise ValueError(f"registry {self.name!r}: a name is needed to register {obj!r}.")
        if key in self._entries and self._entries[key] is not obj and not override:
            raise ValueError(
                f"registry {self.name!r}: {key!r} is already registered to {self._entries[key]!r}; "
                "pass override=True to replace it."
            )
        self._entries[key] = obj
        return obj

    def unregister(self, name: str) -> Any:
        """Remove and return the entry ``name`` (KeyError if absent)."""
        return self._entries.pop(name)

    def _ensure_loaded(self) -> None:
        if not self._builtins_loaded:
            self._builtins_loaded = True
            for module in self._builtin_modules:
                importlib.import_module(module)
        load_plugins()

    def get(self, name: str) -> Any:
        """Return the object registered under ``name``."""
        self._ensure_loaded()
        if name in self._entries:
            return self._entries[name]
        close = difflib.get_close_matches(str(name), list(self._entries), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        failed = f" Plugins that failed to load: {_plugin_errors}." if _plugin_errors else ""
        raise KeyError(
            f"unknown {self.name} entry {name!r}. Registered: {sorted(self._entries) or 'none'}.{hint}{failed}"
        )

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Look up ``name`` and call it with the given arguments (e.g. to construct a class)."""
        return self.get(name)(*args, **kwargs)

    def names(self) -> list[str]:
        """Sorted names of all entries, built-ins and plugins included."""
        self._ensure_loaded()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._ensure_loaded()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.name!r}, entries={sorted(self._entries)})"


DATASETS = Registry("dataset", builtin_modules=("monai_kdx.data.synthetic",))
NETWORKS = Registry("network", builtin_modules=("monai_kdx.networks.builders",))
"""The allow-list of network builders that network specs read from files may name (see
:mod:`monai_kdx.networks.builders`)."""
EXPLAINERS = Registry("explainer", builtin_modules=("monai_kdx.explain.cam", "monai_kdx.explain.attribution"))
RELEVANCE_METHODS = Registry("relevance method", builtin_modules=("monai_kdx.pruning.relevance",))
DISTILLATION_LOSSES = Registry("distillation loss", builtin_modules=("monai_kdx.losses.distillation",))
SALIENCY_LOSSES = Registry("saliency loss", builtin_modules=("monai_kdx.losses.saliency",))

REGISTRIES: dict[str, Registry] = {
    "datasets": DATASETS,
    "networks": NETWORKS,
    "explainers": EXPLAINERS,
    "relevance_methods": RELEVANCE_METHODS,
    "distillation_losses": DISTILLATION_LOSSES,
    "saliency_losses": SALIENCY_LOSSES,
}


def load_plugins(reload: bool = False) -> list[str]:
    """Load every entry point of the group ``monai_kdx.plugins`` (once per process).

    A plugin that fails to load is reported with a warning naming it and the error, and listed in
    the message of any later failed lookup; the other plugins still load.

    Args:
        reload: load the entry points again even if they were loaded before.

    Returns:
        The names of the entry points loaded by this call.
    """
    global _plugins_loaded
    with _plugin_lock:
        if _plugins_loaded and not reload:
            return []
        _plugins_loaded = True
        loaded = []
        for entry_point in importlib.metadata.entry_points(group=PLUGIN_GROUP):
            try:
                target: Callable[[], Any] | Any = entry_point.load()
                if callable(target) and not inspect.ismodule(target) and not inspect.isclass(target):
                    target()
            except Exception as error:  # a broken third-party plugin must not break the others
                _plugin_errors[entry_point.name] = f"{type(error).__name__}: {error}"
                warnings.warn(
                    f"monai_kdx plugin {entry_point.name!r} ({entry_point.value}) failed to load: {error}",
                    stacklevel=2,
                )
                continue
            _plugin_errors.pop(entry_point.name, None)
            loaded.append(entry_point.name)
        return loaded
