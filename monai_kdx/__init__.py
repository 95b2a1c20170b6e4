"""monai_kdx: knowledge distillation, relevance pruning, saliency regularization and hierarchical
explanations for MONAI classification models, in 2D and 3D.

Subpackages are imported on demand so that ``import monai_kdx`` stays cheap:

- :mod:`monai_kdx.registry`: named, pluggable registries (``monai_kdx.plugins`` entry points).
- :mod:`monai_kdx.networks`: feature capture by module path.
- :mod:`monai_kdx.data`: semi-synthetic lesion datasets on real anatomy, with ground truth.
- :mod:`monai_kdx.tracking`: MLflow helpers.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = (
    "apps",
    "cli",
    "data",
    "engines",
    "explain",
    "handlers",
    "losses",
    "metrics",
    "networks",
    "pruning",
    "registry",
    "tracking",
    "transforms",
)

__all__ = ["__version__", *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
