"""DICOM series from volumes: one folder a series, one file a slice, with the geometry MONAI's readers use.

Radiology data often arrives as DICOM series; datalist entries may name a series folder wherever they name an image
file (MONAI's ``LoadImaged`` reads it with ``PydicomReader``, the heatmaps take its spacing and orientation).
:func:`write_dicom_series` writes one from an array, e.g. to try a pipeline on DICOM or to test a reader.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["write_dicom_series"]


def write_dicom_series(
    volume: np.ndarray,
    folder: str | os.PathLike,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    patient_id: str = "anonymous",
    modality: str = "MR",
) -> Path:
    """Write a 3D volume as a DICOM series of axial slices (MR Image Storage, 16-bit with a rescale slope and
    intercept that keep the values to 1/65535 of their range).

    The geometry is DICOM's (patient LPS): voxel ``volume[i, j, k]`` is at ``origin + (i * spacing[0],
    j * spacing[1], k * spacing[2])`` (Image Orientation Patient ``[1, 0, 0, 0, 1, 0]``, Image Position Patient per
    slice, Pixel Spacing, Slice Thickness). MONAI's ``LoadImage`` gives the array back as ``volume`` with the
    matching RAS affine ``diag(-spacing[0], -spacing[1], spacing[2])`` at ``(-origin[0], -origin[1], origin[2])``.

    Args:
        volume: the voxels, shape (X, Y, Z): X along the rows of a slice (columns of the image), Z the slices.
        folder: the series' folder (created; it must not hold ``.dcm`` files already).
        spacing: voxel size in mm along X, Y, Z.
        origin: position in mm of voxel (0, 0, 0) (patient LPS).
        patient_id: the Patient ID of every slice.
        modality: the Modality of every slice.

    Returns:
        The folder.

    Raises:
        ValueError: ``volume`` is not 3D or not finite, a spacing is not positive, or ``folder`` holds a series.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    volume = np.asarray(volume, dtype=np.float64)
    if volume.ndim != 3 or not np.isfinite(volume).all():
        raise ValueError(f"a DICOM series needs a finite 3D volume, got shape {volume.shape}.")
    if len(spacing) != 3 or min(spacing) <= 0 or len(origin) != 3:
        raise ValueError(f"spacing must be 3 positive sizes and origin 3 coordinates, got {spacing}, {origin}.")
    folder = Path(folder)
    if folder.is_dir() and any(folder.glob("*.dcm")):
        raise ValueError(f"{folder} already holds a DICOM series; give a new folder.")
    folder.mkdir(parents=True, exist_ok=True)
    low, high = float(volume.min()), float(volume.max())
    slope = (high - low) / 65535.0 if high > low else 1.0
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for k in range(volume.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID, ds.PatientName = modality, patient_id, patient_id
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [float(origin[0]), float(origin[1]), float(origin[2]) + k * float(spacing[2])]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # between rows (along Y), between columns (X)
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, low
        stored = np.round((volume[:, :, k] - low) / slope).astype(np.uint16)
        ds.PixelData = np.ascontiguousarray(stored.T).tobytes()  # row-major: one row per Y, one column per X
        ds.save_as(folder / f"slice_{k:04d}.dcm", enforce_file_format=True)
    return folder
