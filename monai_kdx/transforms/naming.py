"""Output names of per-case files (NIfTI heatmaps, figures) that are unique and stable.

Two test images may share a file name in different folders (``patientA/t1.nii.gz``, ``patientB/t1.nii.gz``) or
differ only after a dot (``sub-01.ses-1.nii.gz``, ``sub-01.ses-2.nii.gz``); names built from the base name up to
the first dot make their outputs overwrite each other. :func:`case_name` names a case by its path relative to the
dataset's folder (the datalist's folder), folders joined by ``__``, only the image extension removed;
:class:`CaseFolderLayout` is the MONAI ``FolderLayoutBase`` that ``SaveImaged`` uses with it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from monai.data.folder_layout import FolderLayoutBase

__all__ = ["IMAGE_EXTENSIONS", "case_name", "CaseFolderLayout"]

IMAGE_EXTENSIONS = (
    ".nii.gz",
    ".nii",
    ".mha",
    ".mhd",
    ".nrrd",
    ".dcm",
    ".png",
    ".jpg",
    ".jpeg",
    ".tif",
    ".tiff",
    ".npy",
)
"""Extensions removed from a case's name (a DICOM series folder has none)."""


def case_name(source: Any, data_root: str | os.PathLike | None = None) -> str:
    """A unique, stable, file-system-safe name for the case read from ``source``.

    Args:
        source: the image's path (``meta["filename_or_obj"]``), a file or a DICOM series folder.
        data_root: the dataset's folder; the name is the path relative to it (the base name when ``source`` lies
            outside it, or without a root).

    Returns:
        e.g. ``patientA__t1`` for ``<root>/patientA/t1.nii.gz``, ``sub-01.ses-1`` for ``sub-01.ses-1.nii.gz``.
    """
    path = Path(str(source))
    relative = path.name
    if data_root:
        try:
            relative = os.path.relpath(path.resolve(), Path(data_root).resolve())
        except ValueError:  # another drive
            relative = path.name
        if relative.startswith(".."):
            relative = path.name
    for extension in IMAGE_EXTENSIONS:
        if relative.lower().endswith(extension):
            relative = relative[: -len(extension)]
            break
    return relative.replace(os.sep, "__").replace("/", "__") or "case"


class CaseFolderLayout(FolderLayoutBase):
    """``output_dir/<case name>_<postfix><extension>`` for MONAI's ``SaveImaged(folder_layout=...)``, the case name
    from :func:`case_name` (relative to ``data_root``).

    Args:
        output_dir: the folder of the files (created).
        postfix: appended to the case name (``"cam"``, ``"levels"``).
        extension: the file extension, e.g. ``".nii.gz"``.
        data_root: the dataset's folder (e.g. the datalist's folder).
    """

    def __init__(
        self, output_dir: str, postfix: str = "", extension: str = ".nii.gz", data_root: str | None = None
    ) -> None:
        self.output_dir, self.postfix, self.data_root = output_dir, postfix, data_root
        self.extension = extension if not extension or extension.startswith(".") else f".{extension}"

    def filename(self, subject: Any = "case", idx: Any = None, **kwargs: Any) -> str:
        os.makedirs(self.output_dir, exist_ok=True)
        name = case_name(subject, self.data_root)
        parts = [name, self.postfix, *([str(idx)] if idx is not None else [])]
        return os.path.join(self.output_dir, "_".join(part for part in parts if part) + self.extension)
