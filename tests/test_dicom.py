"""DICOM series written with pydicom read back by MONAI with the voxels and geometry they were written with."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
from monai.transforms import LoadImage

from monai_kdx.data import check_datalist
from monai_kdx.data.dicom import write_dicom_series


def test_a_written_series_reads_back_with_its_voxels_spacing_orientation_and_position(tmp_path):
    volume = np.random.default_rng(0).random((12, 10, 8)) * 300 - 100
    folder = write_dicom_series(volume, tmp_path / "series", spacing=(1.5, 1.2, 2.0), origin=(-20.0, 10.0, 5.0))
    files = sorted(folder.glob("*.dcm"))
    assert len(files) == 8
    third = pydicom.dcmread(files[3])
    assert [float(v) for v in third.ImagePositionPatient] == [-20.0, 10.0, 11.0]  # 5 + 3 slices of 2 mm
    assert [float(v) for v in third.PixelSpacing] == [1.2, 1.5] and (third.Rows, third.Columns) == (10, 12)
    assert [float(v) for v in third.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]

    image = LoadImage(image_only=True)(str(folder))
    step = (volume.max() - volume.min()) / 65535
    np.testing.assert_allclose(np.asarray(image), volume, atol=step)
    # LPS (DICOM) to RAS (MONAI): x and y flip, by hand
    expected = np.array([[-1.5, 0, 0, 20.0], [0, -1.2, 0, -10.0], [0, 0, 2.0, 5.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(np.asarray(image.affine), expected, atol=1e-6)


def test_a_datalist_of_series_folders_is_checked_like_files(tmp_path):
    rng = np.random.default_rng(1)
    entries = []
    for index in range(2):
        write_dicom_series(rng.random((8, 8, 6)), tmp_path / f"p{index}" / "t1")
        entries.append({"image": f"p{index}/t1", "label": index})
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": entries}))
    summary = check_datalist(datalist, sections=("training",), required=("training",))
    assert summary.spatial_dims == 3 and summary.spatial_shapes == [(8, 8, 6)] and summary.num_classes == 2


def test_bad_volumes_and_a_used_folder_are_refused(tmp_path):
    with pytest.raises(ValueError, match="finite 3D volume"):
        write_dicom_series(np.zeros((4, 4)), tmp_path / "a")
    with pytest.raises(ValueError, match="positive"):
        write_dicom_series(np.zeros((4, 4, 2)), tmp_path / "b", spacing=(1, 0, 1))
    write_dicom_series(np.zeros((4, 4, 2)), tmp_path / "c")
    with pytest.raises(ValueError, match="already holds a DICOM series"):
        write_dicom_series(np.ones((4, 4, 2)), tmp_path / "c")


def test_a_folder_without_a_series_is_named_in_one_line(tmp_path):
    from monai_kdx.data import DatalistError

    write_dicom_series(np.zeros((8, 8, 4)), tmp_path / "good")
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("not a slice")
    for folder, words in (("empty", "is an empty folder"), ("junk", "no DICOM series in the folder")):
        entries = [{"image": "good", "label": 0}, {"image": folder, "label": 1}]
        datalist = tmp_path / f"{folder}.json"
        datalist.write_text(json.dumps({"training": entries}))
        with pytest.raises(DatalistError, match=f"training entry 1 \\({folder}\\).*{words}"):
            check_datalist(datalist, sections=("training",), required=("training",))
