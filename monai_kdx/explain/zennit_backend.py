"""Importing zennit on machines without a working torchvision.

zennit's ``__init__`` imports ``zennit.torchvision``, whose only use of torchvision is to recognise
torchvision's ResNet blocks for its ``ResNetCanonizer``. There is no CPU build of torchvision for
every torch, and a CUDA torchvision next to a CPU torch fails at import, so :func:`import_zennit`
imports zennit with a placeholder ``torchvision.models.resnet`` in ``sys.modules`` *only* while
zennit is being imported, and only when the real torchvision cannot be imported. The placeholder
classes never match any module, so zennit's torchvision canonizers simply find nothing to do; the
placeholder is removed again, so other libraries still see that torchvision is missing.
"""

from __future__ import annotations

import importlib
import sys
import types
from types import ModuleType

__all__ = ["import_zennit"]

_PLACEHOLDER = ("torchvision", "torchvision.models", "torchvision.models.resnet")


def _torchvision_works() -> bool:
    if "torchvision" in sys.modules:
        return True
    try:
        importlib.import_module("torchvision")
    except Exception:  # ImportError, or RuntimeError from a torchvision built for another torch
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        return False
    return True


def import_zennit() -> ModuleType:
    """Import and return ``zennit`` (attribution rules, composites, canonizers).

    Raises:
        ImportError: zennit is not installed (``pip install zennit`` or ``make install``).
    """
    if "zennit" in sys.modules:
        return sys.modules["zennit"]
    if _torchvision_works():
        return importlib.import_module("zennit")
    resnet = types.ModuleType("torchvision.models.resnet")
    resnet.Bottleneck = type("Bottleneck", (), {})  # never an instance's type: matches no module
    resnet.BasicBlock = type("BasicBlock", (), {})
    models = types.ModuleType("torchvision.models")
    models.resnet = resnet
    package = types.ModuleType("torchvision")
    package.models = models
    sys.modules.update(dict(zip(_PLACEHOLDER, (package, models, resnet), strict=True)))
    try:
        return importlib.import_module("zennit")
    finally:
        for name in _PLACEHOLDER:
            sys.modules.pop(name, None)
