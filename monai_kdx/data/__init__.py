"""Semi-synthetic lesion classification datasets on real anatomy, with ground truth for explanations.

Kinds: ``brain-mri-3d`` (default; 4 brain-tumour-like classes on the MNI152 T1 template), ``chest-xray-2d``
(normal, nodule, consolidation on a real radiograph) and ``retina-2d`` (normal, microaneurysms, exudates on a
fundus photograph). Every sample has a lesion mask, an anatomy mask, simulated fixations and a gaze heatmap,
and optionally a spurious corner marker; see :mod:`monai_kdx.data.synthetic`.

Example:
    >>> from monai_kdx.data import ensure_dataset, load_datalist
    >>> datalist = ensure_dataset("data/brain", kind="brain-mri-3d", n=200, seed=0)  # doctest: +SKIP
    >>> training = load_datalist(datalist, "training")  # doctest: +SKIP

Heavy dependencies (torch, nilearn, pydicom, scikit-image) are imported only when data is generated.
"""

from __future__ import annotations

from monai_kdx.data.checks import DatalistError, DatalistSummary, check_datalist, read_image_shape
from monai_kdx.data.gaze import fixations_to_binary_map, fixations_to_heatmap, simulate_fixations
from monai_kdx.data.io import DatasetExistsError, ensure_dataset, load_datalist, write_dataset
from monai_kdx.data.synthetic import (
    BrainMRIGenerator,
    ChestXRayGenerator,
    Component,
    LesionRecipe,
    RetinaGenerator,
    SyntheticGenerator,
    SyntheticSample,
    class_names,
    generate_dataset,
    generate_sample,
    get_generator,
    iter_samples,
)

__all__ = [
    "SyntheticSample",
    "SyntheticGenerator",
    "BrainMRIGenerator",
    "ChestXRayGenerator",
    "RetinaGenerator",
    "LesionRecipe",
    "Component",
    "generate_sample",
    "generate_dataset",
    "iter_samples",
    "get_generator",
    "class_names",
    "write_dataset",
    "ensure_dataset",
    "load_datalist",
    "check_datalist",
    "read_image_shape",
    "DatalistError",
    "DatalistSummary",
    "DatasetExistsError",
    "fixations_to_heatmap",
    "fixations_to_binary_map",
    "simulate_fixations",
]
