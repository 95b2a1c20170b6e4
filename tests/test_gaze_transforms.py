"""Gaze and mask transforms: heatmaps follow MONAI's spatial transforms through the affines, Gaussian widths
in mm become per-axis pixel widths, durations weigh peaks, datasets' gaze maps are reproduced; 2D and 3D."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Flipd, LoadImaged, Spacingd, SpatialCropd, Zoomd

from monai_kdx.data import write_dataset
from monai_kdx.data.io import load_datalist
from monai_kdx.transforms import GazeToHeatmapd, MaskToSaliencyd

SHAPES = {2: (20, 24), 3: (20, 24, 16)}
FIXATION = {2: [6.0, 9.0], 3: [6.0, 9.0, 7.0]}


def _nifti_with_dot(tmp_path, dims: int):
    """A NIfTI image, anisotropic and shifted affine, with a bright voxel at FIXATION[dims]."""
    affine = np.diag([2.0, 1.5, 3.0, 1.0])
    affine[:3, 3] = [10.0, -5.0, 7.0]
    array = np.zeros(SHAPES[dims], np.float32)
    array[tuple(int(v) for v in FIXATION[dims])] = 1.0
    path = tmp_path / f"dot{dims}.nii.gz"
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return str(path)


def _centroid(array: np.ndarray) -> np.ndarray:
    array = np.clip(array, 0, None)
    grids = np.indices(array.shape)
    return np.array([(g * array).sum() / array.sum() for g in grids])


def _second_moments(array: np.ndarray) -> np.ndarray:
    center = _centroid(array)
    grids = np.indices(array.shape)
    return np.array([(((g - c) ** 2) * array).sum() / array.sum() for g, c in zip(grids, center, strict=True)])


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize(
    "spatial",
    [
        lambda d: SpatialCropd("image", roi_start=(2, 3, 1)[:d], roi_end=(15, 20, 12)[:d]),
        lambda d: Zoomd("image", zoom=1.5, keep_size=False),
        lambda d: Spacingd("image", pixdim=(1.0,) * d),
        lambda d: Flipd("image", spatial_axis=0),
    ],
    ids=["crop", "zoom", "spacing", "flip"],
)
def test_heatmap_peak_follows_spatial_transforms(tmp_path, dims, spatial):
    """The image's bright voxel and the fixation on it end up at the same place after the transform."""
    transform = Compose(
        [
            LoadImaged("image", ensure_channel_first=True, image_only=True),
            spatial(dims),
            GazeToHeatmapd("fixations", "image", "gaze", sigma_mm=0.0, box_radius=0),
        ]
    )
    out = transform({"image": _nifti_with_dot(tmp_path, dims), "fixations": [[*FIXATION[dims], 250.0]]})
    image, gaze = out["image"], out["gaze"]
    assert isinstance(gaze, MetaTensor) and gaze.shape == (1, *image.shape[1:])
    assert torch.equal(gaze.affine, image.affine)  # aligned for SaveImaged
    true_position = _centroid(image[0].numpy())  # where the transform put the bright voxel (sub-voxel)
    peak = np.array(np.unravel_index(int(gaze[0].argmax()), gaze.shape[1:]))
    assert np.all(np.abs(peak - true_position) <= 0.5 + 1e-6), (peak, true_position)
    assert float(gaze.max()) == 1.0 and float(gaze.sum()) == 1.0  # one voxel, no smoothing


@pytest.mark.parametrize("dims", [2, 3])
def test_sigma_in_mm_becomes_per_axis_pixels(dims):
    spacing = (1.0, 2.0, 0.5)[:dims]
    affine = torch.diag(torch.tensor([*spacing, *(1.0,) * (4 - dims)], dtype=torch.float64))
    shape = (41,) * dims
    image = MetaTensor(torch.zeros(1, *shape), affine=affine)
    center = [20.0] * dims
    out = GazeToHeatmapd(sigma_mm=2.0, box_radius=0)({"image": image, "fixations": [center]})
    heat = out["gaze"][0].numpy().astype(np.float64)
    sigma_px = 2.0 / np.asarray(spacing)  # (2, 1, 4) pixels
    np.testing.assert_allclose(np.sqrt(_second_moments(heat)), sigma_px, rtol=0.03)
    np.testing.assert_allclose(_centroid(heat), center, atol=1e-6)
    # FWHM along axis 0 through the peak: 2·sqrt(2·ln 2)·sigma
    profile = heat[(slice(None),) + (20,) * (dims - 1)]
    above = np.flatnonzero(profile >= 0.5 * profile.max())
    fwhm = above[-1] - above[0] + 1
    assert abs(fwhm - 2 * np.sqrt(2 * np.log(2)) * sigma_px[0]) <= 1.0


@pytest.mark.parametrize("dims", [2, 3])
def test_durations_weigh_peaks(dims):
    image = MetaTensor(torch.zeros(1, *(24,) * dims))
    points = [[5.0] * dims, [18.0] * dims]
    fixations = [[*points[0], 100.0], [*points[1], 300.0]]
    weighted = GazeToHeatmapd(sigma_mm=1.0, box_radius=0)({"image": image, "fixations": fixations})["gaze"][0]
    flat = GazeToHeatmapd(sigma_mm=1.0, box_radius=0, use_durations=False)({"image": image, "fixations": fixations})
    low, high = (tuple(int(v) for v in p) for p in points)
    assert float(weighted[high]) == pytest.approx(1.0)
    assert float(weighted[low]) == pytest.approx(1.0 / 3.0, rel=1e-4)
    assert float(flat["gaze"][0][low]) == pytest.approx(float(flat["gaze"][0][high]), rel=1e-6)
    no_durations = GazeToHeatmapd(sigma_mm=1.0, box_radius=0)({"image": image, "fixations": points})["gaze"]
    assert torch.allclose(no_durations, flat["gaze"])


def test_reproduces_the_datasets_gaze_maps(tmp_path):
    """On a dataset as written (chest 2D), fixations + the generator's sigma give the stored heatmap."""
    datalist = write_dataset(tmp_path / "data", kind="chest-xray-2d", n=3, seed=0, progress=False, spatial_size=32)
    entry = load_datalist(datalist, "training")[0]
    transform = Compose(
        [
            LoadImaged(["image", "gaze"], ensure_channel_first=True, image_only=True),
            GazeToHeatmapd("fixations", "image", "rendered", sigma_mm=10.0),  # the chest generator's gaze_sigma_mm
        ]
    )
    out = transform(entry)
    assert out["rendered"].shape == out["gaze"].shape
    np.testing.assert_allclose(out["rendered"].numpy(), out["gaze"].numpy(), atol=1e-5)


def test_fixations_outside_the_image_fail_before_work(tmp_path):
    image = MetaTensor(torch.zeros(1, 16, 16))
    with pytest.raises(ValueError, match=r"fixation 1 at \[3.0, 17.0\] lies outside the image of shape \(16, 16\)"):
        GazeToHeatmapd()({"image": image, "fixations": [[2.0, 2.0, 100.0], [3.0, 17.0, 100.0]]})
    with pytest.raises(ValueError, match="negative durations"):
        GazeToHeatmapd()({"image": image, "fixations": [[2.0, 2.0, -1.0]]})
    with pytest.raises(ValueError, match="rows"):
        GazeToHeatmapd()({"image": image, "fixations": [[2.0, 2.0, 1.0, 1.0]]})
    with pytest.raises(ValueError, match="sigma_mm"):
        GazeToHeatmapd(sigma_mm=-1.0)
    # after a crop, fixations outside the cropped field are simply left out (inside the original image)
    crop = Compose(
        [
            LoadImaged("image", ensure_channel_first=True, image_only=True),
            SpatialCropd("image", roi_start=(0, 0), roi_end=(8, 8)),
            GazeToHeatmapd(sigma_mm=0.0, box_radius=0),
        ]
    )
    out = crop({"image": _nifti_with_dot(tmp_path, 2), "fixations": [[15.0, 20.0]]})
    assert out["gaze"].shape == (1, 8, 8) and float(out["gaze"].abs().sum()) == 0.0
    assert GazeToHeatmapd()({"image": image, "fixations": []})["gaze"].abs().sum() == 0  # no fixation: zeros


@pytest.mark.parametrize("dims", [2, 3])
def test_mask_to_saliency(dims):
    spacing = (1.0, 2.0, 0.5)[:dims]
    affine = torch.diag(torch.tensor([*spacing, *(1.0,) * (4 - dims)], dtype=torch.float64))
    mask = torch.zeros(1, *(33,) * dims, dtype=torch.uint8)
    mask[(0,) + (16,) * dims] = 2  # any label > 0 is lesion
    data = {"mask": MetaTensor(mask, affine=affine), "empty": MetaTensor(torch.zeros_like(mask), affine=affine)}
    plain = MaskToSaliencyd(["mask", "empty"], output_key=["plain", "plain_empty"])(data)
    assert plain["plain"].dtype == torch.float32 and float(plain["plain"].max()) == 1.0
    assert float(plain["plain"].sum()) == 1.0 and float(plain["plain_empty"].abs().sum()) == 0.0
    smooth = MaskToSaliencyd(["mask", "empty"], smooth_mm=2.0)(data)  # replaces the masks
    blurred = smooth["mask"][0].numpy().astype(np.float64)
    assert blurred.min() >= 0 and blurred.max() == pytest.approx(1.0)
    np.testing.assert_allclose(np.sqrt(_second_moments(blurred)), 2.0 / np.asarray(spacing), rtol=0.03)
    assert float(smooth["empty"].abs().sum()) == 0.0  # an empty mask stays all zeros
    assert torch.equal(smooth["mask"].affine, data["mask"].affine)
    with pytest.raises(ValueError, match="negative"):
        MaskToSaliencyd()({"mask": torch.full((1, 4, 4), -1.0)})
    with pytest.raises(ValueError, match="NaN"):
        MaskToSaliencyd()({"mask": torch.full((1, 4, 4), float("nan"))})
