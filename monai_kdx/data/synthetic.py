"""Semi-synthetic lesion classification datasets on real anatomy, with ground truth for explanations.

Every sample is one real anatomy (see :mod:`monai_kdx.data.anatomy`) seen through a window (the field of
view, resampled to ``spatial_size``) after a small random affine deformation (rotation, per-axis scale,
translation) that stands in for the variability between patients; then a lesion of the sample's class is
drawn on the output grid, inside the anatomy mask, and a smooth multiplicative bias field, a global gain and
Gaussian noise are applied. Each sample comes with its lesion mask, anatomy mask, simulated fixations and gaze
heatmap, and (with ``shortcut_p > 0``) a spurious corner marker and its mask.

Kinds (registered in :data:`monai_kdx.registry.DATASETS`):

========================  ======  ==============================================================================
kind                      dims    classes
========================  ======  ==============================================================================
``brain-mri-3d``          3D      no_tumor, glioma (ring-enhancing, intra-axial in the white matter),
                                  meningioma (extra-axial: a homogeneous bright dome on the brain surface),
                                  pituitary (small, round, inferior midline)
``chest-xray-2d``         2D      normal, nodule (small round well-defined opacity),
                                  consolidation (larger, patchy, ill-defined opacity)
``retina-2d``             2D      normal, microaneurysms (several tiny dark dots),
                                  exudates (a cluster of bright irregular spots)
========================  ======  ==============================================================================

Determinism: a sample depends only on ``(kind, seed, index, knobs)`` and, through the shortcut marker only,
on its split. Its random numbers come from ``numpy.random.SeedSequence([seed, index])``. Labels are balanced
by blocks: indices ``[b * C, (b + 1) * C)`` (``C`` classes) hold each class once, in an order shuffled by
``(seed, b)``; so the label of an index does not depend on the dataset size ``n`` either, and any ``n``
holds each class ``n // C`` or ``n // C + 1`` times.

Units: lesion sizes are radii in mm; contrast, noise and the bias field are relative to bright tissue, which
is about 1.0 in every anatomy; the deformation's translation is in output voxels.

Difficulty: the defaults aim at a task a small CNN learns well but not perfectly. Measured on CPU with a
4-block conv net (BatchNorm statistics recomputed on the training set before each evaluation; n=400 or 600,
70/15/15 splits, Adam 1e-3, batch 8): ``brain-mri-3d`` about 87% test accuracy after 25 epochs at 64^3 (the
misses are mostly small, faint gliomas called ``no_tumor``), ``retina-2d`` about 92% after 30 epochs,
``chest-xray-2d`` about 80% after 60 epochs (consolidation vs normal is the hard pair). Raise
``lesion_contrast`` or ``lesion_size`` for an easier task, or ``noise`` for a harder one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from monai_kdx.data import anatomy as _anatomy
from monai_kdx.data.gaze import fixations_to_heatmap, simulate_fixations
from monai_kdx.registry import DATASETS

__all__ = [
    "GENERATOR_VERSION",
    "SPLITS",
    "SyntheticSample",
    "PROFILES",
    "Component",
    "LesionRecipe",
    "SyntheticGenerator",
    "BrainMRIGenerator",
    "ChestXRayGenerator",
    "RetinaGenerator",
    "get_generator",
    "class_names",
    "label_of",
    "assign_splits",
    "generate_sample",
    "iter_samples",
    "generate_dataset",
]

GENERATOR_VERSION = "1"
SPLITS = ("training", "validation", "test")
DEFAULT_SPLIT_FRACTIONS = (0.7, 0.15, 0.15)
_LABEL_STREAM, _SPLIT_STREAM = 1_000_003, 1_000_033  # extra SeedSequence words for the label and split draws
_MARKER_CORNERS = 4
_MARKER_VALUE = 1.5


@dataclass
class SyntheticSample:
    """One generated image with its ground truth.

    Spatial shapes are ``(H, W)`` for 2D kinds and ``(H, W, D)`` for 3D kinds (no channel axis).

    Attributes:
        image: float32 image.
        mask: uint8 lesion mask (all zeros for the normal class); inside ``anatomy_mask``.
        anatomy_mask: uint8 mask of the organ (brain, lung fields, fundus disc).
        gaze: float32 simulated gaze heatmap in [0, 1].
        fixations: one ``[i, j, (k,) duration_ms]`` list per fixation, positions in array indices.
        label: class index.
        class_name: class name.
        affine: 4x4 float64 matrix from array indices to mm (for 2D, the first two axes are the image's).
        marker_mask: uint8 mask of the spurious corner marker, or None without a shortcut.
        marker_corner: index 0-3 of the marker's corner (``2 * high_on_axis_0 + high_on_axis_1``), or None.
        split: ``"training"``, ``"validation"`` or ``"test"``.
        index: the sample's index in its dataset.
        kind: the dataset kind.
    """

    image: np.ndarray
    mask: np.ndarray
    anatomy_mask: np.ndarray
    gaze: np.ndarray
    fixations: list[list[float]]
    label: int
    class_name: str
    affine: np.ndarray
    marker_mask: np.ndarray | None = None
    marker_corner: int | None = None
    split: str = "training"
    index: int = 0
    kind: str = ""

    @property
    def spatial_dims(self) -> int:
        """2 or 3."""
        return self.image.ndim

    @property
    def spacing(self) -> np.ndarray:
        """Pixel or voxel size in mm along each array axis, shape ``(spatial_dims,)``."""
        return np.linalg.norm(self.affine[: self.spatial_dims, : self.spatial_dims], axis=0)

    @property
    def fixation_points(self) -> np.ndarray:
        """Fixation positions, shape ``(F, spatial_dims)``."""
        return np.asarray(self.fixations, dtype=np.float64).reshape(-1, self.spatial_dims + 1)[:, :-1]

    @property
    def fixation_durations(self) -> np.ndarray:
        """Fixation durations in ms, shape ``(F,)``."""
        return np.asarray(self.fixations, dtype=np.float64).reshape(-1, self.spatial_dims + 1)[:, -1]


# --------------------------------------------------------------------------------------------- lesion drawing
def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _rim(rho: np.ndarray, texture: np.ndarray) -> np.ndarray:
    """An uneven rim just inside the border (ring enhancement)."""
    return np.clip(np.exp(-(((rho - 0.7) / 0.25) ** 2)) * (1.0 + 0.4 * texture), 0.0, 1.0)


def _core(rho: np.ndarray, texture: np.ndarray) -> np.ndarray:
    """The centre, fading out at 60% of the radius (a necrotic core)."""
    return np.clip(np.clip(1.0 - rho / 0.6, 0.0, 1.0) ** 0.5 * (1.0 + 0.25 * texture), 0.0, 1.0)


def _plateau(rho: np.ndarray, texture: np.ndarray) -> np.ndarray:
    """Homogeneous, with a sharp edge."""
    return _sigmoid((1.0 - rho) / 0.08)


def _sphere(rho: np.ndarray, texture: np.ndarray) -> np.ndarray:
    """Projected thickness of a sphere: a round, well-defined opacity."""
    return np.sqrt(np.clip(1.0 - rho**2, 0.0, None))


def _patchy(rho: np.ndarray, texture: np.ndarray) -> np.ndarray:
    """Ill-defined edge and patchy inside."""
    return _sigmoid((1.0 - rho) / 0.2) * (0.6 + 0.4 * _sigmoid(2.5 * texture))


def _dot(rho: np.ndarray, texture: np.ndarray) -> np.ndarray:
    """A small Gaussian dot."""
    return np.exp(-2.0 * rho**2)


PROFILES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "rim": _rim,
    "core": _core,
    "plateau": _plateau,
    "sphere": _sphere,
    "patchy": _patchy,
    "dot": _dot,
}
"""Lesion weight maps in [0, 1] as functions of the normalized radius ``rho`` and a unit-variance texture."""


@dataclass(frozen=True)
class Component:
    """One intensity pattern of a lesion: a weight map in [0, 1] and how it changes the image.

    Attributes:
        profile: name of the weight map in :data:`PROFILES`.
        polarity: +1 brighter, -1 darker.
        level: None for an additive change ``polarity * contrast * weight`` (e.g. an extra attenuation on a
            radiograph); a number to let the lesion replace the tissue: the image moves towards
            ``level + polarity * contrast`` by ``weight`` (with ``level=1``, contrast enhancement brighter than
            any normal tissue, whatever tissue the lesion sits on).
    """

    profile: str
    polarity: float = 1.0
    level: float | None = None


@dataclass(frozen=True)
class LesionRecipe:
    """How the lesions of one class are drawn (the normal class has no recipe).

    A lesion is an ellipsoid (2D: ellipse) of normalized radius ``rho`` (``rho <= 1`` is the lesion mask),
    randomly rotated, with radii ``size * size_scale * aspect`` (``size`` drawn from the generator's
    ``lesion_size``, ``contrast`` from its ``lesion_contrast``), a lobulated border when ``lobes > 0``, and one
    or more intensity :class:`Component` s, applied inside the anatomy only.

    Attributes:
        components: the intensity patterns, applied in order.
        region: where the centre may lie: an anatomy region (``"white_matter"``, ``"sellar"``), ``"surface"``
            (the anatomy's outer layer, one voxel thick) or None (anywhere in the anatomy).
        min_depth: the centre's minimum distance to the anatomy's border, in units of the lesion radius
            (relaxed when no voxel qualifies).
        size_scale: factor on the generator's ``lesion_size``.
        aspect: range of the per-axis factors on the radius.
        lobes: amplitude of the border's lobulation (0: smooth ellipsoid).
        count: inclusive range of the number of lesions.
        cluster_mm: with several lesions, the maximum distance of each centre from the first one.
    """

    components: tuple[Component, ...]
    region: str | None = None
    min_depth: float = 1.0
    size_scale: float = 1.0
    aspect: tuple[float, float] = (0.9, 1.1)
    lobes: float = 0.0
    count: tuple[int, int] = (1, 1)
    cluster_mm: float = math.inf


@dataclass
class _Canvas:
    """The warped anatomy a lesion is drawn on (all arrays share the output shape)."""

    image: np.ndarray
    anatomy_soft: np.ndarray
    depth: np.ndarray
    regions: dict[str, np.ndarray]
    spacing: np.ndarray

    @property
    def anatomy(self) -> np.ndarray:
        return self.anatomy_soft > 0.5


def _random_rotation(spatial_dims: int, rng: np.random.Generator, max_angle: float = math.pi) -> np.ndarray:
    """A rotation matrix built from one (2D) or three (3D) angles drawn in ``[-max_angle, max_angle]``."""
    angles = rng.uniform(-max_angle, max_angle, size=1 if spatial_dims == 2 else 3)
    rotation = np.eye(spatial_dims)
    planes = [(0, 1)] if spatial_dims == 2 else [(0, 1), (0, 2), (1, 2)]
    for angle, (a, b) in zip(angles, planes, strict=True):
        plane = np.eye(spatial_dims)
        plane[a, a] = plane[b, b] = math.cos(angle)
        plane[a, b], plane[b, a] = -math.sin(angle), math.sin(angle)
        rotation = rotation @ plane
    return rotation


def _smooth_noise(shape: tuple[int, ...], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-filtered white noise scaled to unit standard deviation."""
    from scipy import ndimage

    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    return noise / max(float(noise.std()), 1e-8)


def _low_frequency_field(shape: tuple[int, ...], rng: np.random.Generator, cells: int = 3) -> np.ndarray:
    """A smooth random field (about unit amplitude): a coarse grid of normals, interpolated (bias fields)."""
    import torch
    import torch.nn.functional as F

    coarse = torch.from_numpy(rng.standard_normal((1, 1) + (cells + 1,) * len(shape)).astype(np.float32))
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    return F.interpolate(coarse, size=shape, mode=mode, align_corners=True)[0, 0].numpy()


def _pick_voxel(candidates: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    flat = np.flatnonzero(candidates)
    return np.array(np.unravel_index(flat[rng.integers(len(flat))], candidates.shape))


def _draw_lesions(recipe: LesionRecipe, canvas: _Canvas, knobs: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    """Draw the recipe's lesions into ``canvas.image`` (in place); return the bool lesion mask."""
    shape, spacing, anatomy = canvas.image.shape, canvas.spacing, canvas.anatomy
    if recipe.region is None:
        region = anatomy
    elif recipe.region == "surface":
        region = anatomy & (canvas.depth <= spacing.max())
    else:
        region = anatomy & (canvas.regions[recipe.region] > 0.5)
    if not region.any():
        region = anatomy if anatomy.any() else np.ones(shape, dtype=bool)
    grid = np.indices(shape, sparse=True)
    mask = np.zeros(shape, dtype=bool)
    first_center = None
    for _ in range(int(rng.integers(recipe.count[0], recipe.count[1] + 1))):
        radius = rng.uniform(*knobs["lesion_size"]) * recipe.size_scale
        contrast = rng.uniform(*knobs["lesion_contrast"])
        candidates = region & (canvas.depth >= recipe.min_depth * radius)
        if first_center is not None and math.isfinite(recipe.cluster_mm):
            distance2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, first_center, spacing, strict=True))
            near = distance2 <= recipe.cluster_mm**2
            candidates = (candidates & near) if (candidates & near).any() else (region & near)
        if not candidates.any():  # too deep a request for this anatomy: take the deepest voxels of the region
            candidates = region & (canvas.depth >= canvas.depth[region].max() - 1e-6)
        center = _pick_voxel(candidates, rng)
        first_center = center if first_center is None else first_center

        radii = radius * rng.uniform(*recipe.aspect, size=len(shape))
        half = np.ceil(radii.max() * (1.0 + recipe.lobes) * 1.8 / spacing).astype(int) + 1
        box = tuple(slice(max(c - h, 0), min(c + h + 1, s)) for c, h, s in zip(center, half, shape, strict=True))
        offsets = np.stack(
            np.meshgrid(
                *[(np.arange(b.start, b.stop) - c) * s for b, c, s in zip(box, center, spacing, strict=True)],
                indexing="ij",
            ),
            axis=-1,
        )
        local = offsets @ _random_rotation(len(shape), rng) / radii
        rho = np.linalg.norm(local, axis=-1)
        if recipe.lobes > 0:  # lobulated border: the radius varies smoothly with the direction
            direction = local / np.maximum(rho, 1e-6)[..., None]
            axes = rng.standard_normal((3, len(shape)))
            axes /= np.linalg.norm(axes, axis=1, keepdims=True)
            phases, frequencies = rng.uniform(0, 2 * math.pi, 3), rng.uniform(2.0, 4.0, 3)
            wobble = sum(np.cos(f * direction @ a + p) for a, p, f in zip(axes, phases, frequencies, strict=True))
            rho = rho / (1.0 + recipe.lobes * wobble / 3.0)
        texture = _smooth_noise(rho.shape, sigma=max(0.8, 0.25 * radius / spacing.min()), rng=rng)
        for component in recipe.components:
            weight = PROFILES[component.profile](rho, texture) * canvas.anatomy_soft[box]
            if component.level is None:
                change = component.polarity * contrast * weight
            else:
                change = weight * (component.level + component.polarity * contrast - canvas.image[box])
            canvas.image[box] += change.astype(np.float32)
        lesion = (rho <= 1.0) & anatomy[box]
        lesion[tuple(c - b.start for c, b in zip(center, box, strict=True))] = True  # never empty (centre inside)
        mask[box] |= lesion
    return mask


# ------------------------------------------------------------------------------------------ warping anatomy
_source_cache: dict[tuple[Any, tuple[float, ...]], Any] = {}


def _prefiltered_source(loader: Callable[[], _anatomy.Anatomy], sigma: Sequence[float]) -> Any:
    """Anatomy channels (image, mask, depth, regions...) as a ``(1, C, *source_shape)`` float32 tensor.

    The image is low-pass filtered with ``sigma`` (in source voxels) against aliasing when downsampling. The
    last few results are cached (one per output spacing in use).
    """
    import torch
    from scipy import ndimage

    key = (loader, tuple(round(float(s), 3) for s in sigma))
    if key not in _source_cache:
        source = loader()
        image = ndimage.gaussian_filter(source.image, key[1]) if any(s > 0 for s in key[1]) else source.image
        channels = [image, source.mask.astype(np.float32), source.depth, *source.regions.values()]
        if len(_source_cache) >= 4:
            _source_cache.pop(next(iter(_source_cache)))
        _source_cache[key] = torch.from_numpy(np.stack(channels).astype(np.float32))[None]
    return _source_cache[key]


def _warp(source: Any, matrix: np.ndarray, out_shape: tuple[int, ...]) -> np.ndarray:
    """Sample ``source`` (``(1, C, *in_shape)``) at ``matrix @ [index, 1]`` for every output index.

    Args:
        source: the source tensor.
        matrix: ``(d + 1, d + 1)`` map from output array indices to source array indices.
        out_shape: output spatial shape.

    Returns:
        ``(C, *out_shape)`` float32 array (trilinear/bilinear interpolation, zeros outside the source).
    """
    import torch
    import torch.nn.functional as F

    d = len(out_shape)
    in_shape = torch.tensor(source.shape[2:], dtype=torch.float64)
    index = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in out_shape], indexing="ij"), -1)
    matrix_t = torch.from_numpy(matrix)
    src = index @ matrix_t[:d, :d].T + matrix_t[:d, d]
    normalized = 2.0 * src / (in_shape - 1) - 1.0  # align_corners=True convention
    grid = normalized.flip(-1).to(torch.float32)[None]  # grid_sample wants (x, y, z) = reversed array axes
    return F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0].numpy()


# ---------------------------------------------------------------------------------------------- generators
def _as_range(name: str, value: Any, low: float = 0.0) -> list[float]:
    pair = [float(v) for v in (value if isinstance(value, Sequence) else (value, value))]
    if len(pair) != 2 or not all(math.isfinite(v) for v in pair) or not low <= pair[0] <= pair[1]:
        raise ValueError(f"{name} must be a number or a (min, max) pair with {low} <= min <= max; got {value!r}.")
    return pair


def _as_per_axis(name: str, value: Any, spatial_dims: int, integer: bool = False) -> list[Any]:
    values = list(value) if isinstance(value, Sequence) else [value] * spatial_dims
    if len(values) != spatial_dims:
        raise ValueError(f"{name} needs 1 or {spatial_dims} values for a {spatial_dims}D kind; got {value!r}.")
    cast = int if integer else float
    if any(isinstance(v, bool) or not isinstance(v, int | float) or v <= 0 or not math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be positive numbers; got {value!r}.")
    if integer and any(v != int(v) for v in values):
        raise ValueError(f"{name} must be integers; got {value!r}.")
    return [cast(v) for v in values]


def _as_number(name: str, value: Any, low: float = 0.0, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ValueError(f"{name} must be a number in [{low}, {high}]; got {value!r}.")
    return float(value)


class SyntheticGenerator:
    """Base class of the dataset kinds: draws samples of one kind with fixed knobs.

    Subclasses set the class attributes (``kind``, ``class_names``, ``spatial_dims``, ``recipes``, ``defaults``)
    and :meth:`load_anatomy`; register them with ``@DATASETS.register("my-kind")`` to make a new kind.

    Every knob left as None takes the kind's default (``defaults``):

    Args:
        spatial_size: output shape, an int (cubic/square) or one per axis; at least 16 per axis.
        field_of_view_mm: side of the window on the anatomy in mm (an int/float or one per axis); the
            spacing is ``field_of_view_mm / spatial_size``.
        lesion_size: (min, max) lesion radius in mm, drawn uniformly per lesion (each class scales it).
        lesion_contrast: (min, max) intensity change of a lesion relative to bright tissue (about 1.0).
        noise: standard deviation of the additive Gaussian noise (relative to bright tissue).
        bias_field: amplitude of the smooth multiplicative bias field (0.1: about +-10%).
        max_rotation_deg: maximum rotation of the random deformation per angle.
        max_scale: maximum relative scaling per axis of the deformation (0.05: +-5%).
        max_translation: maximum translation of the deformation per axis, in output voxels.
        gaze_sigma_mm: standard deviation of the gaze heatmap's Gaussian in mm.
        shortcut_p: probability that the corner marker encodes the class in the training and validation
            splits; 0 means no marker at all (see :meth:`sample`).

    Raises:
        ValueError: a knob out of range.
    """

    kind: ClassVar[str] = ""
    class_names: ClassVar[tuple[str, ...]] = ()
    spatial_dims: ClassVar[int] = 2
    recipes: ClassVar[dict[str, LesionRecipe]] = {}
    defaults: ClassVar[dict[str, Any]] = {}
    common_defaults: ClassVar[dict[str, Any]] = {
        "bias_field": 0.1,
        "max_rotation_deg": 5.0,
        "max_scale": 0.05,
        "max_translation": 3.0,
        "shortcut_p": 0.0,
    }

    def __init__(
        self,
        spatial_size: int | Sequence[int] | None = None,
        field_of_view_mm: float | Sequence[float] | None = None,
        lesion_size: float | Sequence[float] | None = None,
        lesion_contrast: float | Sequence[float] | None = None,
        noise: float | None = None,
        bias_field: float | None = None,
        max_rotation_deg: float | None = None,
        max_scale: float | None = None,
        max_translation: float | None = None,
        gaze_sigma_mm: float | None = None,
        shortcut_p: float | None = None,
    ) -> None:
        given = dict(locals())
        given.pop("self")
        defaults = {**self.common_defaults, **self.defaults}
        value = {name: defaults[name] if given[name] is None else given[name] for name in given}
        d = self.spatial_dims
        self.knobs: dict[str, Any] = {
            "spatial_size": _as_per_axis("spatial_size", value["spatial_size"], d, integer=True),
            "field_of_view_mm": _as_per_axis("field_of_view_mm", value["field_of_view_mm"], d),
            "lesion_size": _as_range("lesion_size", value["lesion_size"]),
            "lesion_contrast": _as_range("lesion_contrast", value["lesion_contrast"]),
            "noise": _as_number("noise", value["noise"]),
            "bias_field": _as_number("bias_field", value["bias_field"], high=1.0),
            "max_rotation_deg": _as_number("max_rotation_deg", value["max_rotation_deg"], high=180.0),
            "max_scale": _as_number("max_scale", value["max_scale"], high=0.5),
            "max_translation": _as_number("max_translation", value["max_translation"]),
            "gaze_sigma_mm": _as_number("gaze_sigma_mm", value["gaze_sigma_mm"]),
            "shortcut_p": _as_number("shortcut_p", value["shortcut_p"], high=1.0),
        }
        if min(self.knobs["spatial_size"]) < 16:
            raise ValueError(f"spatial_size must be at least 16 per axis; got {value['spatial_size']!r}.")
        if self.knobs["lesion_size"][0] <= 0:
            raise ValueError(f"lesion_size must be positive; got {value['lesion_size']!r}.")
        missing = [name for name in self.class_names[1:] if name not in self.recipes]
        if missing:
            raise TypeError(f"{type(self).__name__} has no lesion recipe for classes {missing}.")

    # --- hooks for subclasses
    @classmethod
    def load_anatomy(cls) -> _anatomy.Anatomy:
        """Return the (cached) source anatomy of this kind."""
        raise NotImplementedError

    def window_center(self, anatomy: _anatomy.Anatomy, rng: np.random.Generator) -> np.ndarray:
        """Centre of the field of view in source array indices; default: the anatomy mask's centre."""
        return anatomy.center

    # --- shared machinery
    @property
    def spacing(self) -> np.ndarray:
        """Output pixel or voxel size in mm, shape ``(spatial_dims,)``."""
        return np.asarray(self.knobs["field_of_view_mm"]) / np.asarray(self.knobs["spatial_size"])

    def _window(self, anatomy: _anatomy.Anatomy, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Return the output affine (4x4, index to mm) and the sampling matrix (output to source index)."""
        d = self.spatial_dims
        size = np.asarray(self.knobs["spatial_size"], dtype=np.float64)
        zoom = self.spacing / anatomy.spacing  # source voxels per output voxel
        center = self.window_center(anatomy, rng)
        window = np.eye(d + 1)  # output index -> source index, without deformation
        window[:d, :d] = np.diag(zoom)
        window[:d, d] = center - zoom * (size - 1) / 2
        source_to_mm = np.eye(4)
        source_to_mm[:d, :d], source_to_mm[:d, 3] = anatomy.affine[:d, :d], anatomy.affine[:d, 3]
        embedded = np.eye(4)
        embedded[:d, :d], embedded[:d, 3] = window[:d, :d], window[:d, d]
        affine = source_to_mm @ embedded
        if d == 2:
            affine[2, 3] = anatomy.affine[2, 3]

        # the deformation acts in mm around the window centre (patient variability; not part of the affine)
        rotation = _random_rotation(d, rng, math.radians(self.knobs["max_rotation_deg"]))
        scale = 1.0 + rng.uniform(-self.knobs["max_scale"], self.knobs["max_scale"], size=d)
        shift = rng.uniform(-self.knobs["max_translation"], self.knobs["max_translation"], size=d) * self.spacing
        linear = np.diag(1.0 / anatomy.spacing) @ rotation @ np.diag(scale) @ np.diag(self.spacing)
        matrix = np.eye(d + 1)
        matrix[:d, :d] = linear
        matrix[:d, d] = center + shift / anatomy.spacing - linear @ ((size - 1) / 2)
        return affine, matrix

    def _marker(self, rng: np.random.Generator, label: int, split: str) -> tuple[np.ndarray | None, int | None]:
        """The corner marker's mask and corner (None, None without shortcut).

        Corners are those of the plane of axes 0 and 1 (for 3D, in a slab at the high end of axis 2);
        corner ``c`` is at the low or high end of axis 0 for ``c // 2`` = 0 or 1, of axis 1 for ``c % 2``.
        """
        p = self.knobs["shortcut_p"]
        encode, random_corner = rng.random() < p, int(rng.integers(_MARKER_CORNERS))
        if p == 0:
            return None, None
        corner = label % _MARKER_CORNERS if (encode and split != "test") else random_corner
        size = self.knobs["spatial_size"]
        side, margin = max(2, round(min(size) / 16)), max(1, round(min(size) / 32))

        def span(axis: int, high: bool) -> slice:
            start = size[axis] - margin - side if high else margin
            return slice(start, start + side)

        marker = np.zeros(size, dtype=np.uint8)
        box = [span(0, corner // 2 == 1), span(1, corner % 2 == 1)] + [span(a, True) for a in range(2, len(size))]
        marker[tuple(box)] = 1
        return marker, corner

    def sample(self, index: int, seed: int = 0, split: str = "training") -> SyntheticSample:
        """Generate sample ``index`` of the dataset with ``seed``.

        The shortcut marker (only when ``shortcut_p > 0``) sits at corner ``label % 4`` with probability
        ``shortcut_p`` in the training and validation splits and at a random corner otherwise; in the test
        split always at a random corner. The draws are the same in every split, so the image differs between
        splits only in the marker.

        Args:
            index: non-negative sample index.
            seed: non-negative dataset seed.
            split: ``"training"``, ``"validation"`` or ``"test"``.

        Returns:
            A :class:`SyntheticSample`; spatial shape ``spatial_size``.
        """
        index, seed = _check_index("index", index), _check_index("seed", seed)
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits: {list(SPLITS)}.")
        label = label_of(index, seed, len(self.class_names))
        class_name = self.class_names[label]
        rng_window, rng_lesion, rng_noise, rng_gaze, rng_marker = (
            np.random.default_rng(child) for child in np.random.SeedSequence([seed, index]).spawn(5)
        )
        anatomy = self.load_anatomy()
        affine, matrix = self._window(anatomy, rng_window)
        sigma = tuple(max(0.0, (z - 1.0) / 2.0) for z in self.spacing / anatomy.spacing)
        shape = tuple(self.knobs["spatial_size"])
        warped = _warp(_prefiltered_source(type(self).load_anatomy, sigma), matrix, shape)
        canvas = _Canvas(
            image=warped[0],
            anatomy_soft=np.clip(warped[1], 0.0, 1.0),
            depth=warped[2],
            regions=dict(zip(anatomy.regions, warped[3:], strict=True)),
            spacing=self.spacing,
        )
        anatomy_mask = canvas.anatomy
        if class_name in self.recipes:
            lesion = _draw_lesions(self.recipes[class_name], canvas, self.knobs, rng_lesion)
        else:
            lesion = np.zeros(shape, dtype=bool)

        image = canvas.image * np.exp(self.knobs["bias_field"] * _low_frequency_field(shape, rng_noise))
        image = image * rng_noise.uniform(0.9, 1.1) + self.knobs["noise"] * rng_noise.standard_normal(shape)
        marker, corner = self._marker(rng_marker, label, split)
        if marker is not None:
            image[marker > 0] = _MARKER_VALUE

        points, durations = simulate_fixations(lesion, anatomy_mask, rng_gaze)
        gaze = fixations_to_heatmap(points, durations, shape, sigma=self.knobs["gaze_sigma_mm"] / self.spacing)
        return SyntheticSample(
            image=image.astype(np.float32),
            mask=lesion.astype(np.uint8),
            anatomy_mask=anatomy_mask.astype(np.uint8),
            gaze=gaze,
            fixations=np.concatenate([points, durations[:, None]], axis=1).tolist(),
            label=label,
            class_name=class_name,
            affine=affine,
            marker_mask=marker,
            marker_corner=corner,
            split=split,
            index=index,
            kind=self.kind,
        )


@DATASETS.register("brain-mri-3d")
class BrainMRIGenerator(SyntheticGenerator):
    """3D brain MRI (T1, MNI152 template) with brain-tumour-like lesions; 4 classes.

    Samples are ``(64, 64, 64)`` volumes by default (3 mm isotropic voxels over a 192 mm field of view on the
    brain; RAS axes), labels ``no_tumor``, ``glioma`` (ring-enhancing, 1.3 times ``lesion_size``: an uneven rim
    brighter than white matter, ``1.1 + contrast``, around a dark necrotic core, ``0.5 - contrast``; lobulated,
    centred in the white matter), ``meningioma`` (homogeneous enhancement to ``1 + contrast``, a dome centred
    on the brain surface: the half inside the brain), ``pituitary`` (0.6 times ``lesion_size``, round,
    homogeneous ``1 + contrast``, at the inferior midline above the sella). Bright tissue (white matter) is
    about 1.0 before the gain, bias field and noise.
    """

    kind = "brain-mri-3d"
    class_names = ("no_tumor", "glioma", "meningioma", "pituitary")
    spatial_dims = 3
    recipes = {
        "glioma": LesionRecipe(
            (Component("rim", level=1.1), Component("core", polarity=-1.0, level=0.5)),
            region="white_matter",
            size_scale=1.3,
            aspect=(0.75, 1.25),
            lobes=0.25,
        ),
        "meningioma": LesionRecipe((Component("plateau", level=1.0),), region="surface", min_depth=0.0, lobes=0.05),
        "pituitary": LesionRecipe((Component("plateau", level=1.0),), region="sellar", min_depth=0.5, size_scale=0.6),
    }
    defaults = {
        "spatial_size": 64,
        "field_of_view_mm": 192.0,
        "lesion_size": (10.0, 24.0),
        "lesion_contrast": (0.1, 0.4),
        "noise": 0.05,
        "gaze_sigma_mm": 8.0,
    }

    @classmethod
    def load_anatomy(cls) -> _anatomy.Anatomy:
        return _anatomy.load_brain_mri()


@DATASETS.register("chest-xray-2d")
class ChestXRayGenerator(SyntheticGenerator):
    """2D chest radiograph crops (``RG1_UNCR.dcm``) with nodules and consolidations; 3 classes.

    Samples are ``(128, 128)`` crops by default over a 200 mm field of view (1.5625 mm pixels) centred on a
    random point deep in the lung fields; labels ``normal``, ``nodule`` (small round well-defined opacity,
    the projection of a sphere, as dense as ``1 + contrast`` at its centre: denser than the lungs and about as
    dense as bone) and ``consolidation`` (2.5 times larger, lobulated, patchy, ill-defined opacity of the same
    density).
    """

    kind = "chest-xray-2d"
    class_names = ("normal", "nodule", "consolidation")
    spatial_dims = 2
    recipes = {
        "nodule": LesionRecipe((Component("sphere", level=1.0),), lobes=0.05),
        "consolidation": LesionRecipe(
            (Component("patchy", level=1.0),), min_depth=0.3, size_scale=2.5, aspect=(0.7, 1.3), lobes=0.35
        ),
    }
    defaults = {
        "spatial_size": 128,
        "field_of_view_mm": 200.0,
        "lesion_size": (5.0, 12.0),
        "lesion_contrast": (0.1, 0.4),
        "noise": 0.04,
        "gaze_sigma_mm": 10.0,
    }

    @classmethod
    def load_anatomy(cls) -> _anatomy.Anatomy:
        return _anatomy.load_chest_xray()

    def window_center(self, anatomy: _anatomy.Anatomy, rng: np.random.Generator) -> np.ndarray:
        """A random point deep in a lung field (at least half the largest depth), kept so the window stays
        inside the radiograph."""
        half = np.asarray(self.knobs["field_of_view_mm"]) / anatomy.spacing / 2
        high = np.asarray(anatomy.image.shape) - 1 - half
        deep = anatomy.depth >= 0.5 * anatomy.depth.max()
        return np.clip(_pick_voxel(deep, rng).astype(np.float64), np.minimum(half, high), np.maximum(half, high))


@DATASETS.register("retina-2d")
class RetinaGenerator(SyntheticGenerator):
    """2D fundus photographs (scikit-image ``retina``, green channel) with retinal lesions; 3 classes.

    Samples are ``(128, 128)`` by default over a 14 mm field of view (about 0.11 mm pixels); labels
    ``normal``, ``microaneurysms`` (4-10 tiny dark dots, 1.5 times ``lesion_size``, as dark as ``0.3 -
    contrast`` at their centre, within 3 mm of each other), ``exudates`` (2-6 irregular spots, twice
    ``lesion_size``, brighter by ``contrast``, within 1.5 mm of each other). The retina's background is about
    0.45 and the optic disc about 1.
    """

    kind = "retina-2d"
    class_names = ("normal", "microaneurysms", "exudates")
    spatial_dims = 2
    recipes = {
        "microaneurysms": LesionRecipe(
            (Component("dot", polarity=-1.0, level=0.3),), min_depth=4.0, size_scale=1.5, count=(4, 10), cluster_mm=3.0
        ),
        "exudates": LesionRecipe(
            (Component("plateau"),),
            min_depth=4.0,
            size_scale=2.0,
            lobes=0.35,
            aspect=(0.7, 1.3),
            count=(2, 6),
            cluster_mm=1.5,
        ),
    }
    defaults = {
        "spatial_size": 128,
        "field_of_view_mm": 14.0,
        "lesion_size": (0.08, 0.16),
        "lesion_contrast": (0.1, 0.3),
        "noise": 0.03,
        "gaze_sigma_mm": 0.4,
    }

    @classmethod
    def load_anatomy(cls) -> _anatomy.Anatomy:
        return _anatomy.load_retina()


# ---------------------------------------------------------------------------------------- functional API
def _check_index(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer; got {value!r}.")
    return int(value)


def get_generator(kind: str) -> type[SyntheticGenerator]:
    """The generator class registered for ``kind`` in :data:`monai_kdx.registry.DATASETS`.

    Raises:
        ValueError: unknown kind; the message lists the valid kinds.
    """
    if not isinstance(kind, str) or kind not in DATASETS:
        raise ValueError(f"unknown dataset kind {kind!r}; valid kinds: {DATASETS.names()}.")
    return DATASETS.get(kind)


def class_names(kind: str) -> list[str]:
    """Class names of ``kind``, in label order."""
    return list(get_generator(kind).class_names)


def label_of(index: int, seed: int, n_classes: int) -> int:
    """Label of sample ``index``: each block of ``n_classes`` indices holds every class once, shuffled."""
    block, position = divmod(_check_index("index", index), n_classes)
    sequence = np.random.SeedSequence([_check_index("seed", seed), block, _LABEL_STREAM])
    return int(np.random.default_rng(sequence).permutation(n_classes)[position])


def assign_splits(labels: Sequence[int], seed: int, fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS) -> list[str]:
    """Stratified split names for ``labels``.

    Within each class, ``round(k * fraction)`` samples go to validation and to test; every split with a
    positive fraction gets at least one sample of a class that has at least three (two: training and test),
    and training always keeps at least one. Which samples go where is shuffled with ``seed``.

    Args:
        labels: one label per sample.
        seed: non-negative seed of the shuffle.
        fractions: (training, validation, test), non-negative, summing to 1, training positive.

    Returns:
        One of ``"training"``, ``"validation"``, ``"test"`` per sample.
    """
    fractions = [float(f) for f in fractions]
    if len(fractions) != 3 or min(fractions) < 0 or fractions[0] <= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(
            f"split fractions must be 3 non-negative numbers summing to 1 with training > 0; got {fractions}."
        )
    labels = np.asarray(labels)
    rng = np.random.default_rng(np.random.SeedSequence([_check_index("seed", seed), _SPLIT_STREAM]))
    splits = np.empty(len(labels), dtype=object)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        k = len(members)
        counts = {name: math.floor(k * f + 0.5) for name, f in zip(SPLITS[1:], fractions[1:], strict=True)}
        for name, f in zip(("test", "validation"), (fractions[2], fractions[1]), strict=True):
            if f > 0 and counts[name] == 0 and k - sum(counts.values()) > 1:
                counts[name] = 1
        while sum(counts.values()) > k - 1:  # keep one for training
            largest = max(counts, key=lambda name: counts[name])
            counts[largest] -= 1
        n_val, n_test = counts["validation"], counts["test"]
        splits[members[:n_val]] = "validation"
        splits[members[n_val : n_val + n_test]] = "test"
        splits[members[n_val + n_test :]] = "training"
    return splits.tolist()


def generate_sample(kind: str, index: int, seed: int = 0, split: str = "training", **knobs: Any) -> SyntheticSample:
    """Generate one sample (see :meth:`SyntheticGenerator.sample`).

    Args:
        kind: a registered dataset kind, e.g. ``"brain-mri-3d"``, ``"chest-xray-2d"``, ``"retina-2d"``.
        index: non-negative sample index.
        seed: non-negative dataset seed.
        split: the split the sample belongs to (only matters for the shortcut marker).
        knobs: keyword arguments of the kind's generator (see :class:`SyntheticGenerator`).

    Returns:
        The :class:`SyntheticSample`, shapes ``(H, W)`` or ``(H, W, D)``.
    """
    return get_generator(kind)(**knobs).sample(index, seed, split)


def _check_n(n: Any, n_classes: int, kind: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < n_classes:
        raise ValueError(
            f"n must be an integer of at least the number of classes of {kind!r} ({n_classes}); got {n!r}."
        )
    return int(n)


def iter_samples(
    kind: str = "brain-mri-3d",
    n: int = 200,
    seed: int = 0,
    progress: bool = False,
    split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    **knobs: Any,
) -> Iterator[SyntheticSample]:
    """Yield the ``n`` samples of a dataset one at a time, in index order (see :func:`generate_dataset`).

    All arguments are checked before the first sample is drawn.
    """
    generator = get_generator(kind)(**knobs)
    n_classes = len(generator.class_names)
    n = _check_n(n, n_classes, kind)
    splits = assign_splits([label_of(i, seed, n_classes) for i in range(n)], seed, split_fractions)

    def samples() -> Iterator[SyntheticSample]:
        indices: Any = range(n)
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices, desc=f"generating {kind}", unit="sample")
        for index in indices:
            yield generator.sample(index, seed, splits[index])

    return samples()


def generate_dataset(
    kind: str = "brain-mri-3d",
    n: int = 200,
    seed: int = 0,
    progress: bool = False,
    split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    **knobs: Any,
) -> list[SyntheticSample]:
    """Generate ``n`` samples in memory, with balanced labels and stratified splits.

    Args:
        kind: a registered dataset kind.
        n: number of samples, at least the number of classes.
        seed: non-negative dataset seed.
        progress: show a tqdm progress bar.
        split_fractions: (training, validation, test) fractions, see :func:`assign_splits`.
        knobs: keyword arguments of the kind's generator (see :class:`SyntheticGenerator`).

    Returns:
        ``n`` samples in index order, each with its ``split``.

    Raises:
        ValueError: unknown kind, ``n`` too small, invalid seed, fractions or knobs.
    """
    return list(iter_samples(kind, n, seed, progress, split_fractions, **knobs))
