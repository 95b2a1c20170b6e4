"""Dictionary transforms that turn human annotations into saliency targets: fixation lists into gaze
heatmaps (:class:`GazeToHeatmapd`) and lesion masks into saliency maps (:class:`MaskToSaliencyd`).

Both read the reference image's geometry from its ``MetaTensor`` affine, so Gaussian widths are given in
millimetres and converted per axis with the current pixel or voxel spacing, and both work for 2D
(1, H, W) and 3D (1, H, W, D) images. Fixations are positions in the array indices of the image AS LOADED
(the convention of :mod:`monai_kdx.data.gaze` and of the datalists of :mod:`monai_kdx.data.io`); when
spatial transforms (crop, zoom, spacing, flip, orientation, affine) ran before, each fixation is mapped
through them with the affines: original index → world (mm) with the loaded affine (``meta["original_affine"]``,
set by MONAI's image readers) → current index with the current affine (``image.affine``, which MONAI's
spatial transforms keep up to date).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.utils import to_affine_nd
from monai.transforms import MapTransform
from monai.utils import ensure_tuple_rep

from monai_kdx.data.gaze import fixation_indices, fixations_to_heatmap

__all__ = ["GazeToHeatmapd", "MaskToSaliencyd", "affine_spacing", "map_fixations"]


def _affine_of(image: Any, spatial_dims: int, key: str | None = None) -> np.ndarray:
    """The (d+1, d+1) affine of a MetaTensor (``key=None``: the current one; else ``image.meta[key]``);
    the identity (1 mm pixels) for plain arrays."""
    if not isinstance(image, MetaTensor):
        return np.eye(spatial_dims + 1)
    affine = image.affine if key is None else image.meta[key]
    affine = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    return np.asarray(to_affine_nd(spatial_dims, affine), dtype=np.float64)


def affine_spacing(image: Any, spatial_dims: int) -> np.ndarray:
    """Pixel or voxel size in mm along each array axis (column norms of the current affine), shape (d,)."""
    affine = _affine_of(image, spatial_dims)
    return np.linalg.norm(affine[:spatial_dims, :spatial_dims], axis=0)


def _original_geometry(image: Any, spatial_dims: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """The loaded image's affine and spatial shape (the frame the fixations are given in).

    Raises:
        ValueError: the image went through spatial transforms but carries no ``original_affine``.
    """
    shape = tuple(int(s) for s in image.shape[1:])
    if not isinstance(image, MetaTensor):
        return np.eye(spatial_dims + 1), shape
    if "original_affine" in image.meta:
        original_shape = image.meta.get("spatial_shape", shape)
        original_shape = tuple(int(s) for s in np.asarray(original_shape).reshape(-1)[:spatial_dims])
        return _affine_of(image, spatial_dims, "original_affine"), original_shape
    if image.applied_operations:
        raise ValueError(
            "the reference image went through spatial transforms but its metadata has no 'original_affine' "
            "(set by LoadImage): the fixations cannot be mapped to its current grid."
        )
    return _affine_of(image, spatial_dims), shape


def map_fixations(points: np.ndarray, image: Any) -> np.ndarray:
    """Map fixation positions from the loaded image's array indices to the current ones of ``image``.

    Args:
        points: (F, d) positions in the array indices of the image as loaded.
        image: the reference (C, H, W) or (C, H, W, D) image (a ``MetaTensor`` after any MONAI transforms).

    Returns:
        (F, d) positions in the current array indices (floats; may fall outside after a crop).
    """
    spatial_dims = image.ndim - 1
    original, _ = _original_geometry(image, spatial_dims)
    current = _affine_of(image, spatial_dims)
    transform = np.linalg.solve(current, original)  # original index -> world -> current index
    homogeneous = np.concatenate([points, np.ones((len(points), 1))], axis=1)
    return (homogeneous @ transform.T)[:, :spatial_dims]


def _as_fixations(value: Any, spatial_dims: int, key: Hashable) -> tuple[np.ndarray, np.ndarray | None]:
    """Positions (F, d) and durations (F,) or None from ``[[i, j, (k,) (duration)], ...]``."""
    array = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value, dtype=np.float64)
    if array.size == 0:
        return np.zeros((0, spatial_dims)), None
    if array.ndim != 2 or array.shape[1] not in (spatial_dims, spatial_dims + 1):
        raise ValueError(
            f"{key!r} must list fixations as [position (d={spatial_dims} values), optional duration] rows; got "
            f"an array of shape {array.shape}."
        )
    if not np.isfinite(array).all():
        bad = np.flatnonzero(~np.isfinite(array).all(axis=1))
        raise ValueError(f"{key!r}: fixations {bad.tolist()} hold NaN or infinite values.")
    durations = array[:, spatial_dims] if array.shape[1] == spatial_dims + 1 else None
    if durations is not None and (durations < 0).any():
        bad = np.flatnonzero(durations < 0)
        raise ValueError(f"{key!r}: fixations {bad.tolist()} have negative durations {durations[bad].tolist()}.")
    return array[:, :spatial_dims], durations


class GazeToHeatmapd(MapTransform):
    """Render fixation lists as a gaze heatmap aligned with a reference image.

    Each fixation (a position in the array indices of the reference image as loaded, optionally followed
    by its duration) is mapped to the reference's current grid (see the module docs: crops, zooms,
    resampling and flips applied before are followed), a box of ``2·box_radius + 1`` pixels per axis weighted
    by the duration is placed there, the sum is smoothed by a Gaussian of ``sigma_mm`` millimetres (``sigma_mm
    / spacing`` pixels along each axis, spacing from the reference's current affine) and min-max scaled to
    [0, 1], as :func:`monai_kdx.data.fixations_to_heatmap` does (with the defaults and no transform before, the
    datasets' stored ``gaze`` maps are reproduced). Fixations that a crop moved outside the current grid are
    left out.

    Input: ``data[key]``: ``[[i, j, (k,) duration_ms], ...]`` (a list, array or tensor of shape (F, d) or
    (F, d + 1)); ``data[ref_key]``: the (C, H, W) or (C, H, W, D) image. Output: ``data[output_key]``, a
    (1, H, W) or (1, H, W, D) float32 ``MetaTensor`` with the reference's affine and metadata (so
    ``SaveImaged`` writes it aligned with the image); the fixation list is kept.

    Args:
        keys: key(s) of the fixation lists.
        ref_key: key of the reference image.
        output_key: key(s) of the heatmaps, one per key.
        sigma_mm: standard deviation of the Gaussian in mm (one value, or one per spatial axis); 0: no smoothing.
        use_durations: weigh fixations by their durations (when given); False weighs all equally.
        box_radius: half-width in pixels of the box placed at each fixation (the datasets use 1).
        allow_missing_keys: do not raise when a key is absent.

    Raises:
        ValueError: (before any rendering) a fixation outside the image as loaded (named by its index and
            position), malformed fixation rows, negative durations, a negative sigma, a reference image
            transformed without ``original_affine`` in its metadata.
        KeyError: a missing reference image.

    Example:
        >>> transforms = Compose([
        ...     LoadImaged("image", ensure_channel_first=True),
        ...     Spacingd("image", pixdim=(1.5, 1.5, 1.5)),
        ...     GazeToHeatmapd("fixations", ref_key="image", output_key="gaze", sigma_mm=8.0),
        ... ])
    """

    def __init__(
        self,
        keys: KeysCollection = "fixations",
        ref_key: str = "image",
        output_key: str | Sequence[str] = "gaze",
        sigma_mm: float | Sequence[float] = 10.0,
        use_durations: bool = True,
        box_radius: int | Sequence[int] = 1,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.ref_key = ref_key
        self.output_keys = ensure_tuple_rep(output_key, len(self.keys))
        sigma = np.asarray(sigma_mm, dtype=np.float64).reshape(-1)
        if sigma.size == 0 or not np.isfinite(sigma).all() or (sigma < 0).any():
            raise ValueError(f"sigma_mm must be finite and non-negative, got {sigma_mm!r}.")
        self.sigma_mm = sigma
        self.use_durations = bool(use_durations)
        self.box_radius = box_radius

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.ref_key not in d:
            raise KeyError(f"GazeToHeatmapd needs the reference image {self.ref_key!r}; keys: {list(d)}.")
        image = d[self.ref_key]
        spatial_dims = image.ndim - 1
        if spatial_dims not in (2, 3):
            raise ValueError(f"the reference image must be (C, H, W) or (C, H, W, D), got {tuple(image.shape)}.")
        if self.sigma_mm.size not in (1, spatial_dims):
            raise ValueError(f"sigma_mm has {self.sigma_mm.size} values for a {spatial_dims}D image.")
        jobs = []
        for key, output_key in self.key_iterator(d, self.output_keys):  # check everything first
            points, durations = _as_fixations(d[key], spatial_dims, key)
            _, original_shape = _original_geometry(image, spatial_dims)
            indices, inside = fixation_indices(points, original_shape)
            if not inside.all():
                bad = int(np.flatnonzero(~inside)[0])
                raise ValueError(
                    f"{key!r}: fixation {bad} at {points[bad].round(3).tolist()} lies outside the image of shape "
                    f"{original_shape} ({int((~inside).sum())} of {len(points)} fixations are outside)."
                )
            jobs.append((output_key, points, durations))
        shape = tuple(int(s) for s in image.shape[1:])
        sigma = np.broadcast_to(self.sigma_mm, (spatial_dims,)) / affine_spacing(image, spatial_dims)
        for output_key, points, durations in jobs:
            current = map_fixations(points, image) if len(points) else points
            heatmap = fixations_to_heatmap(
                current,
                durations if self.use_durations else None,
                shape,
                sigma=sigma,
                box_radius=self.box_radius,
            )
            d[output_key] = _like(image, heatmap)
        return d


def _like(image: Any, array: np.ndarray) -> torch.Tensor:
    """A (1, *spatial) float32 tensor with the reference's affine, metadata and applied operations."""
    tensor = torch.as_tensor(np.ascontiguousarray(array), dtype=torch.float32)[None]
    if isinstance(image, MetaTensor):
        meta = dict(image.meta)
        meta["affine"] = image.affine.clone()
        out = MetaTensor(tensor, meta=meta)
        out.applied_operations = list(image.applied_operations)
        return out
    return tensor


class MaskToSaliencyd(MapTransform):
    """Turn a lesion mask into a non-negative saliency target, optionally blurred by a Gaussian in mm.

    The mask (any label > 0 is lesion) becomes a float map of 0 and 1; with ``smooth_mm > 0`` it is
    smoothed by a Gaussian of ``smooth_mm`` millimetres (``smooth_mm / spacing`` pixels per axis, spacing
    from the mask's affine) and scaled to a maximum of 1. An empty mask stays all zeros (a sample that
    saliency losses skip).

    Input: ``data[key]``: (1, H, W) or (1, H, W, D) mask. Output: ``data[output_key]``: float32 map of
    the same shape, a ``MetaTensor`` with the mask's metadata when the mask is one.

    Args:
        keys: key(s) of the masks.
        output_key: key(s) of the maps, one per key; None replaces the masks.
        smooth_mm: standard deviation of the Gaussian in mm (one value or one per axis); 0: no smoothing.
        allow_missing_keys: do not raise when a key is absent.

    Raises:
        ValueError: a mask that is not single-channel 2D/3D, NaN or negative values, a negative ``smooth_mm``.
    """

    def __init__(
        self,
        keys: KeysCollection = "mask",
        output_key: str | Sequence[str] | None = None,
        smooth_mm: float | Sequence[float] = 0.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_keys = self.keys if output_key is None else ensure_tuple_rep(output_key, len(self.keys))
        smooth = np.asarray(smooth_mm, dtype=np.float64).reshape(-1)
        if smooth.size == 0 or not np.isfinite(smooth).all() or (smooth < 0).any():
            raise ValueError(f"smooth_mm must be finite and non-negative, got {smooth_mm!r}.")
        self.smooth_mm = smooth

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from scipy import ndimage

        d = dict(data)
        for key, output_key in self.key_iterator(d, self.output_keys):
            mask = d[key]
            if mask.ndim not in (3, 4) or mask.shape[0] != 1:
                raise ValueError(f"{key!r} must be a (1, H, W) or (1, H, W, D) mask, got {tuple(mask.shape)}.")
            array = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask, dtype=np.float64)[0]
            if not np.isfinite(array).all():
                raise ValueError(f"{key!r} contains NaN or infinite values.")
            if (array < 0).any():
                raise ValueError(f"{key!r} contains negative values; a lesion mask is 0 outside, > 0 inside.")
            spatial_dims = array.ndim
            if self.smooth_mm.size not in (1, spatial_dims):
                raise ValueError(f"smooth_mm has {self.smooth_mm.size} values for a {spatial_dims}D mask.")
            saliency = (array > 0).astype(np.float64)
            if saliency.any() and (self.smooth_mm > 0).any():
                sigma = np.broadcast_to(self.smooth_mm, (spatial_dims,)) / affine_spacing(mask, spatial_dims)
                saliency = ndimage.gaussian_filter(saliency, sigma=tuple(sigma), mode="constant")
                saliency /= max(saliency.max(), np.finfo(np.float64).tiny)
            d[output_key] = _like(mask, saliency.astype(np.float32))
        return d
