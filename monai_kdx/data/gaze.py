"""Simulated eye gaze: fixations on lesions and anatomy, and their heatmaps (2D and 3D).

Coordinate convention (used everywhere in monai_kdx): a fixation point is a position in array indices,
``(i, j)`` for an ``(H, W)`` image and ``(i, j, k)`` for an ``(H, W, D)`` volume, in the order of the
array's axes (no channel axis), floats allowed. A point belongs to the pixel or voxel
``floor(point + 0.5)`` (round half up), so pixel ``(3, 5)`` covers ``[2.5, 3.5) x [4.5, 5.5)``. Points
whose pixel lies outside the array are ignored.

The heatmap follows the eye-gaze datasets of chest X-ray saliency work (e.g. MIMIC-CXR EGD): a small box at
each fixation weighted by its duration, a Gaussian filter, min-max scaling to [0, 1]. The binary fixation
map (1 at each fixated pixel) is what the NSS and AUC-Judd metrics need.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["fixations_to_heatmap", "fixations_to_binary_map", "simulate_fixations", "fixation_indices"]


def _as_points(points: np.ndarray | Sequence[Sequence[float]], spatial_dims: int) -> np.ndarray:
    array = np.asarray(points, dtype=np.float64)
    if array.size == 0:
        return np.zeros((0, spatial_dims))
    if array.ndim != 2 or array.shape[1] != spatial_dims:
        raise ValueError(
            f"fixation points must have shape (n_fixations, {spatial_dims}) for a {spatial_dims}D shape; "
            f"got {array.shape}."
        )
    if not np.all(np.isfinite(array)):
        raise ValueError("fixation points must be finite numbers.")
    return array


def fixation_indices(
    points: np.ndarray | Sequence[Sequence[float]], shape: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Integer pixel or voxel indices of fixation points (round half up), and which lie inside ``shape``.

    Args:
        points: ``(F, 2)`` or ``(F, 3)`` positions in array indices, ``F`` may be 0.
        shape: the spatial shape ``(H, W)`` or ``(H, W, D)``.

    Returns:
        ``indices`` of shape ``(F, spatial_dims)`` (int64) and a bool ``inside`` of shape ``(F,)``.
    """
    array = _as_points(points, len(shape))
    indices = np.floor(array + 0.5).astype(np.int64)
    inside = np.all((indices >= 0) & (indices < np.asarray(shape)), axis=1)
    return indices, inside


def fixations_to_binary_map(points: np.ndarray | Sequence[Sequence[float]], shape: Sequence[int]) -> np.ndarray:
    """Binary fixation map: 1 at every fixated pixel or voxel, 0 elsewhere.

    Args:
        points: ``(F, 2)`` points for a 2D ``shape`` ``(H, W)`` or ``(F, 3)`` for 3D ``(H, W, D)``, in array
            indices (see the module's coordinate convention). Points outside the array are ignored.
        shape: the spatial shape of the map.

    Returns:
        uint8 array of ``shape``.
    """
    shape = tuple(int(s) for s in shape)
    binary = np.zeros(shape, dtype=np.uint8)
    indices, inside = fixation_indices(points, shape)
    binary[tuple(indices[inside].T)] = 1
    return binary


def fixations_to_heatmap(
    points: np.ndarray | Sequence[Sequence[float]],
    durations: np.ndarray | Sequence[float] | None,
    shape: Sequence[int],
    sigma: float | Sequence[float],
    box_radius: int | Sequence[int] = 1,
) -> np.ndarray:
    """Render fixations as a gaze heatmap in [0, 1].

    Each fixation adds its duration to every pixel of a box of ``2 * box_radius + 1`` pixels per axis centred
    on its pixel (cut at the array border); the sum is smoothed by a Gaussian filter (zero padding outside the
    array) and min-max scaled to [0, 1]. No fixation (or zero durations) gives an all-zero map, never NaN.

    Args:
        points: ``(F, 2)`` points for a 2D ``shape`` ``(H, W)`` or ``(F, 3)`` for 3D ``(H, W, D)``, in array
            indices, floats allowed (see the module's coordinate convention). Points outside are ignored.
        durations: ``(F,)`` non-negative weights (fixation durations in ms); None weighs all fixations 1.
        shape: the spatial shape of the heatmap.
        sigma: standard deviation of the Gaussian filter in pixels or voxels; one value per axis allowed (to
            convert millimetres with an anisotropic spacing: ``sigma_mm / spacing``). 0 means no smoothing.
        box_radius: half-width of the box in pixels, an int or one per axis.

    Returns:
        float32 array of ``shape`` with values in [0, 1]; the maximum is 1 unless the map is all zeros.

    Raises:
        ValueError: mismatched shapes, negative or non-finite durations or sigma, negative box radius.
    """
    from scipy import ndimage

    shape = tuple(int(s) for s in shape)
    spatial_dims = len(shape)
    indices, inside = fixation_indices(points, shape)
    weights = np.ones(len(indices)) if durations is None else np.asarray(durations, dtype=np.float64).reshape(-1)
    if weights.shape != (len(indices),):
        raise ValueError(f"got {len(indices)} fixation points but {weights.size} durations.")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError("fixation durations must be finite and non-negative.")
    sigmas = np.broadcast_to(np.asarray(sigma, dtype=np.float64), (spatial_dims,))
    radii = np.broadcast_to(np.asarray(box_radius), (spatial_dims,))
    if not np.all(np.isfinite(sigmas)) or np.any(sigmas < 0):
        raise ValueError(f"sigma must be finite and non-negative; got {sigma}.")
    if np.any(radii < 0) or not np.all(radii == np.round(radii)):
        raise ValueError(f"box_radius must be non-negative integers; got {box_radius}.")

    heatmap = np.zeros(shape, dtype=np.float64)
    indices, weights = indices[inside], weights[inside]
    if len(indices):
        grids = np.meshgrid(*[np.arange(-r, r + 1) for r in radii.astype(int)], indexing="ij")
        offsets = np.stack([g.reshape(-1) for g in grids], axis=1)  # (box voxels, dims)
        cells = (indices[:, None, :] + offsets[None]).reshape(-1, spatial_dims)
        cell_weights = np.repeat(weights, len(offsets))
        keep = np.all((cells >= 0) & (cells < np.asarray(shape)), axis=1)
        np.add.at(heatmap, tuple(cells[keep].T), cell_weights[keep])
    if np.any(sigmas > 0):
        heatmap = ndimage.gaussian_filter(heatmap, sigma=tuple(sigmas), mode="constant")
    low, high = heatmap.min(), heatmap.max()
    if high - low <= 1e-12 * max(abs(high), 1.0):  # constant map: zeros stay zeros, a uniform map becomes ones
        return np.full(shape, 1.0 if high > 0 else 0.0, dtype=np.float32)
    return ((heatmap - low) / (high - low)).astype(np.float32)


def simulate_fixations(
    lesion_mask: np.ndarray,
    anatomy_mask: np.ndarray,
    rng: np.random.Generator,
    n_fixations: tuple[int, int] = (10, 20),
    lesion_share: tuple[float, float] = (0.7, 0.85),
    mean_duration_ms: float = 300.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Simulate a reader's fixations: most on the lesion, the rest on the anatomy.

    The number of fixations is drawn uniformly from ``n_fixations``; a share drawn from ``lesion_share`` of
    them falls on voxels drawn uniformly from ``lesion_mask`` (when it is not empty), the rest on voxels of
    ``anatomy_mask`` (or anywhere when that is empty too). Each point is its voxel's index plus a uniform
    offset in [-0.45, 0.45] per axis, so it rounds back to that voxel. Durations follow a gamma distribution
    (shape 4) with mean ``mean_duration_ms``, 1.3 times longer on the lesion, clipped to [80, 2000] ms. The
    order of fixations is shuffled (a scan path).

    Args:
        lesion_mask: ``(H, W)`` or ``(H, W, D)`` lesion mask (may be empty).
        anatomy_mask: anatomy mask of the same shape.
        rng: the random generator to draw from.
        n_fixations: inclusive range of the number of fixations.
        lesion_share: range of the share of fixations on the lesion.
        mean_duration_ms: mean fixation duration off the lesion.

    Returns:
        ``points`` of shape ``(F, spatial_dims)`` (float64, array indices) and ``durations`` of shape
        ``(F,)`` (float64, ms), both rounded to 1e-3.
    """
    lesion_mask, anatomy_mask = np.asarray(lesion_mask, bool), np.asarray(anatomy_mask, bool)
    if lesion_mask.shape != anatomy_mask.shape:
        raise ValueError(f"lesion mask {lesion_mask.shape} and anatomy mask {anatomy_mask.shape} differ in shape.")
    count = int(rng.integers(n_fixations[0], n_fixations[1] + 1))
    on_lesion = int(round(rng.uniform(*lesion_share) * count)) if lesion_mask.any() else 0
    background = anatomy_mask if anatomy_mask.any() else np.ones_like(anatomy_mask)

    def draw(mask: np.ndarray, how_many: int) -> np.ndarray:
        voxels = np.argwhere(mask)
        chosen = voxels[rng.integers(0, len(voxels), size=how_many)]
        return chosen + rng.uniform(-0.45, 0.45, size=chosen.shape)

    points = np.concatenate([draw(lesion_mask, on_lesion), draw(background, count - on_lesion)], axis=0)
    durations = rng.gamma(4.0, mean_duration_ms / 4.0, size=count)
    durations[:on_lesion] *= 1.3
    durations = np.clip(durations, 80.0, 2000.0)
    order = rng.permutation(count)
    return np.round(points[order], 3), np.round(durations[order], 3)
