"""Figure helpers: focus points, orthogonal planes, and dataset previews written as real PNGs."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest

from monai_kdx.data import generate_dataset
from monai_kdx.visualize import dataset_preview, focus_point, planes


def test_focus_point_mask_centre_heatmap_peak_and_default_centre():
    mask = np.zeros((10, 12, 8))
    mask[2:5, 6:9, 1:4] = 1
    assert focus_point(mask.shape, mask) == (3, 7, 2)
    heat = np.zeros((10, 12))
    heat[7, 1] = 0.9
    heat[3, 3] = 0.4
    assert focus_point(heat.shape, heat) == (7, 1)
    assert focus_point((10, 12, 8), np.zeros((10, 12, 8))) == (5, 6, 4)


def test_planes_2d_and_3d():
    volume = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    axial, coronal, sagittal = planes(volume, (1, 2, 3))
    np.testing.assert_array_equal(axial, volume[:, :, 3].T)
    np.testing.assert_array_equal(coronal, volume[:, 2, :].T)
    np.testing.assert_array_equal(sagittal, volume[1].T)
    image = np.arange(12).reshape(3, 4)
    (only,) = planes(image, (0, 0))
    np.testing.assert_array_equal(only, image)


@pytest.mark.parametrize(("kind", "size", "columns"), [("brain-mri-3d", 32, 4), ("retina-2d", 48, 2)])
def test_dataset_preview_one_row_per_class(kind, size, columns, tmp_path):
    samples = generate_dataset(kind, n=8, seed=2, spatial_size=size)
    figure = dataset_preview(samples)
    rows = len({s.label for s in samples})
    assert len(figure.axes) == rows * columns
    plt.close(figure)
    path = tmp_path / "preview.png"
    dataset_preview(samples, path)
    picture = plt.imread(path)
    assert picture.ndim == 3 and picture.shape[0] > 100 and picture.std() > 0.05
    with pytest.raises(ValueError, match="at least one sample"):
        dataset_preview([])
