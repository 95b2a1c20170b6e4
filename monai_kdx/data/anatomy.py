"""Real anatomy shipped inside installed packages: no download, loaded once per process.

Three sources, each returned as an :class:`Anatomy` at a fixed source resolution:

- :func:`load_brain_mri`: nilearn's MNI152 T1 template (1 mm, skull-stripped) and its brain mask,
  cropped to the brain's bounding box plus a margin. Array axes follow the template (RAS: axis 0 left to
  right, axis 1 posterior to anterior, axis 2 inferior to superior); the affine maps indices to MNI mm.
- :func:`load_chest_xray`: pydicom-data's ``RG1_UNCR.dcm``, a real frontal chest radiograph (1955x1841,
  ``MONOCHROME1``, inverted here so that bone and soft tissue are bright and the lungs dark). Its
  ``PixelSpacing`` is ``0, 0``; a nominal 0.2 mm detector pixel is assumed (which makes the image a
  plausible 391 mm x 368 mm), and the image is resampled to 1 mm pixels. Array axes are (row, column).
- :func:`load_retina`: scikit-image's ``retina()`` fundus photograph (1411x1411 RGB), green channel
  (the usual channel for fundus lesions), at half resolution. A nominal 10 micrometre pixel is assumed at
  full resolution (a 14 mm field, typical of a 45 degree fundus camera), so 0.02 mm after halving.

The anatomy masks are approximations, good enough to place lesions and gaze on:

- brain: the template's own brain mask;
- chest: the lung fields, found by thresholding the smoothed radiograph (Otsu inside a fixed thoracic
  region of interest), keeping the two largest dark components, closing and filling holes. The apices
  above 12% of the image height and the lung bases hidden behind the diaphragm are left out. The source
  radiograph itself shows several round opacities; they appear in every sample of every class, so they
  carry no label information;
- retina: the fundus disc (red channel above a threshold, opened and hole-filled).

Images are scaled so that bright tissue (the 99.5th percentile inside the mask) is about 1.0, which makes
the lesion contrast and noise knobs of :mod:`monai_kdx.data.synthetic` comparable across kinds.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Anatomy", "load_brain_mri", "load_chest_xray", "load_retina"]

CHEST_NOMINAL_PIXEL_MM = 0.2
RETINA_NOMINAL_PIXEL_MM = 0.01


@dataclass(frozen=True)
class Anatomy:
    """A source image with its anatomy mask and helper maps, all on the same grid.

    Shapes are ``(H, W)`` for 2D sources and ``(H, W, D)`` for 3D sources.

    Attributes:
        name: short name of the source.
        image: float32 intensities; bright tissue is about 1.0.
        mask: bool anatomy mask (brain, lungs, fundus disc).
        depth: float32 distance in mm from each voxel inside ``mask`` to the mask's border (0 outside).
        affine: 4x4 float64 matrix from array indices to millimetres (a 2D source uses its first two rows
            and columns and the translation; the third axis is a unit axis).
        regions: named float32 maps in [0, 1] used to place lesions (e.g. ``"white_matter"``).
    """

    name: str
    image: np.ndarray
    mask: np.ndarray
    depth: np.ndarray
    affine: np.ndarray
    regions: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def center(self) -> np.ndarray:
        """Centre of the mask's bounding box in (float) array indices, shape ``(spatial_dims,)``."""
        axes = range(self.spatial_dims)
        bounds = [np.flatnonzero(self.mask.any(axis=tuple(b for b in axes if b != a))) for a in axes]
        return np.array([(b[0] + b[-1]) / 2.0 for b in bounds])

    @property
    def spatial_dims(self) -> int:
        """2 or 3."""
        return self.image.ndim

    @property
    def spacing(self) -> np.ndarray:
        """Pixel or voxel size in mm along each array axis, shape ``(spatial_dims,)``."""
        d = self.spatial_dims
        return np.linalg.norm(self.affine[:d, :d], axis=0)


def _scale_to_reference(image: np.ndarray, mask: np.ndarray, percentile: float = 99.5) -> np.ndarray:
    """Divide by the ``percentile`` of the values inside ``mask`` (so bright tissue is about 1)."""
    reference = float(np.percentile(image[mask], percentile))
    return (image / reference).astype(np.float32)


def _depth_mm(mask: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Euclidean distance (mm) from each voxel inside ``mask`` to the nearest voxel outside it."""
    from scipy import ndimage

    padded = np.pad(mask, 1)  # the array border counts as outside
    depth = ndimage.distance_transform_edt(padded, sampling=spacing)
    return depth[tuple(slice(1, -1) for _ in range(mask.ndim))].astype(np.float32)


def _diagonal_affine(spacing: np.ndarray, origin: np.ndarray | None = None) -> np.ndarray:
    """4x4 affine with the given per-axis spacing (2 or 3 entries) and origin."""
    affine = np.eye(4)
    for axis, step in enumerate(spacing):
        affine[axis, axis] = step
    if origin is not None:
        affine[: len(origin), 3] = origin
    return affine


@functools.lru_cache(maxsize=1)
def load_brain_mri(margin_mm: int = 8) -> Anatomy:
    """MNI152 T1 template (nilearn, offline) cropped to the brain's bounding box plus ``margin_mm``.

    Returns:
        An :class:`Anatomy` with 1 mm voxels (about 161 x 197 x 171), the brain mask, and two regions:
        ``"white_matter"`` (a soft map of the brightest tissue) and ``"sellar"`` (the inferior midline of
        the brain around the sella turcica: |x| <= 4 mm, -12 <= y <= 6 mm, within 14 mm of the brain's
        lower surface), both in [0, 1].
    """
    from nilearn import datasets
    from scipy import ndimage

    template = datasets.load_mni152_template()
    brain = np.asarray(datasets.load_mni152_brain_mask().get_fdata()) > 0
    image = np.asarray(template.get_fdata(), dtype=np.float32)
    affine = np.asarray(template.affine, dtype=np.float64)
    if not np.allclose(affine, np.asarray(datasets.load_mni152_brain_mask().affine)):
        raise RuntimeError("nilearn's MNI152 template and brain mask do not share an affine.")

    nonzero = np.argwhere(brain)
    low = np.maximum(nonzero.min(0) - margin_mm, 0)
    high = np.minimum(nonzero.max(0) + margin_mm + 1, brain.shape)
    crop = tuple(slice(int(a), int(b)) for a, b in zip(low, high, strict=True))
    image, brain = image[crop] * brain[crop], brain[crop]
    shifted = affine.copy()
    shifted[:3, 3] = affine[:3, :3] @ low + affine[:3, 3]
    spacing = np.linalg.norm(shifted[:3, :3], axis=0)

    image = _scale_to_reference(image, brain)
    white_matter = ndimage.gaussian_filter(1.0 / (1.0 + np.exp(-(image - 0.82) / 0.03)), 1.0) * brain

    mni = [shifted[a, a] * np.arange(brain.shape[a]) + shifted[a, 3] for a in range(3)]
    x, y, z = np.meshgrid(*mni, indexing="ij")
    lowest_z = np.where(brain.any(axis=2), np.argmax(brain, axis=2), brain.shape[2]) * shifted[2, 2] + shifted[2, 3]
    sellar = brain & (np.abs(x) <= 4) & (y >= -12) & (y <= 6) & (z <= lowest_z[..., None] + 14)
    return Anatomy(
        name="mni152-t1",
        image=image,
        mask=brain,
        depth=_depth_mm(brain, spacing),
        affine=shifted,
        regions={"white_matter": white_matter.astype(np.float32), "sellar": sellar.astype(np.float32)},
    )


def _lung_fields(image: np.ndarray) -> np.ndarray:
    """Approximate lung mask of a (bright-bone) radiograph at about 1 mm per pixel, shape ``(H, W)``."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu
    from skimage.morphology import disk

    smooth = ndimage.gaussian_filter(image, 4.0)
    height, width = image.shape
    roi = np.zeros(image.shape, dtype=bool)
    roi[int(0.12 * height) : int(0.85 * height), int(0.05 * width) : int(0.95 * width)] = True
    dark = (smooth < threshold_otsu(smooth[roi])) & roi
    labels, count = ndimage.label(dark)
    if count < 2:
        raise RuntimeError("could not find two lung fields in the chest radiograph.")
    sizes = ndimage.sum(dark, labels, range(1, count + 1))
    lungs = np.isin(labels, np.argsort(-sizes)[:2] + 1)
    pad = 12
    lungs = ndimage.binary_closing(np.pad(lungs, pad), structure=disk(10))[pad:-pad, pad:-pad]
    return ndimage.binary_fill_holes(lungs)


@functools.lru_cache(maxsize=1)
def load_chest_xray() -> Anatomy:
    """The chest radiograph ``RG1_UNCR.dcm`` of pydicom-data, inverted, at 1 mm pixels, with lung fields.

    Returns:
        An :class:`Anatomy` of shape ``(391, 368)`` (rows, columns), nominal spacing 1 mm (0.2 mm
        assumed at full resolution), mask = approximate lung fields.
    """
    import pydicom
    from pydicom.data import get_testdata_file
    from skimage.transform import resize

    path = get_testdata_file("RG1_UNCR.dcm")
    if path is None:
        raise RuntimeError("pydicom-data's RG1_UNCR.dcm is not installed (pip install pydicom-data).")
    dataset = pydicom.dcmread(path)
    pixels = dataset.pixel_array.astype(np.float32)
    if dataset.PhotometricInterpretation == "MONOCHROME1":  # high values are dark: invert
        pixels = pixels.max() - pixels
    low, high = np.percentile(pixels, [1.0, 99.5])
    pixels = np.clip((pixels - low) / (high - low), 0.0, None)

    shape = tuple(round(s * CHEST_NOMINAL_PIXEL_MM) for s in pixels.shape)  # 1 mm pixels
    image = resize(pixels, shape, anti_aliasing=True, preserve_range=True).astype(np.float32)
    spacing = np.array(pixels.shape) * CHEST_NOMINAL_PIXEL_MM / np.array(shape)
    lungs = _lung_fields(image)
    return Anatomy(
        name="rg1-uncr-chest",
        image=_scale_to_reference(image, lungs),
        mask=lungs,
        depth=_depth_mm(lungs, spacing),
        affine=_diagonal_affine(spacing),
    )


@functools.lru_cache(maxsize=1)
def load_retina() -> Anatomy:
    """scikit-image's fundus photograph, green channel, at half resolution, with the fundus disc mask.

    Returns:
        An :class:`Anatomy` of shape ``(706, 706)``, nominal spacing 0.02 mm, mask = the fundus disc.
    """
    from scipy import ndimage
    from skimage import data
    from skimage.transform import resize

    rgb = data.retina().astype(np.float32)
    disc = ndimage.binary_fill_holes(ndimage.binary_opening(rgb[..., 0] > 20, iterations=3))
    shape = tuple((s + 1) // 2 for s in disc.shape)
    green = resize(rgb[..., 1], shape, anti_aliasing=True, preserve_range=True).astype(np.float32)
    disc = resize(disc.astype(np.float32), shape, order=1) > 0.5
    disc = ndimage.binary_erosion(disc, iterations=2)  # keep off the dark rim of the photograph
    spacing = np.array(rgb.shape[:2]) * RETINA_NOMINAL_PIXEL_MM / np.array(shape)
    return Anatomy(
        name="skimage-retina",
        image=_scale_to_reference(green * disc, disc),
        mask=disc,
        depth=_depth_mm(disc, spacing),
        affine=_diagonal_affine(spacing),
    )
