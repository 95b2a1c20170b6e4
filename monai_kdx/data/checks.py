"""Checks of a datalist before any work: every file exists and loads, every label is a class index, every image has
the same dimensionality and number of channels, every mask has its image's shape, and the splits that training
needs are not empty. The first problem found is reported in one line naming the datalist, the section, the entry
and the file.

Bundles call :func:`check_datalist` in their ``initialize`` step, the main job before its first stage.
"""

from __future__ import annotations

import json
import numbers
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DatalistError", "DatalistSummary", "check_datalist", "read_image_shape"]

_IMAGE_KEYS = ("image",)
_MAP_KEYS = ("mask", "gaze", "anatomy", "marker")


class DatalistError(ValueError):
    """A datalist entry that cannot be trained on; the message names the datalist, section, entry and file."""


@dataclass
class DatalistSummary:
    """What a datalist holds, read from its files.

    Attributes:
        path: the datalist file.
        counts: section → number of entries.
        num_classes: number of classes (labels 0..K-1).
        spatial_dims: 2 or 3.
        in_channels: channels of every image.
        spatial_shapes: the distinct spatial shapes of the images.
        keys: the map keys every training entry has (``"mask"``, ``"gaze"``, ...).
        class_counts: section → counts per class.
        warnings: problems that do not stop training (e.g. a class missing from the validation split).
    """

    path: str
    counts: dict[str, int]
    num_classes: int
    spatial_dims: int
    in_channels: int
    spatial_shapes: list[tuple[int, ...]]
    keys: list[str]
    class_counts: dict[str, list[int]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def read_image_shape(path: str | os.PathLike, load: bool = True) -> tuple[int, ...]:
    """The channel-first shape (C, *spatial) of an image as ``LoadImaged(ensure_channel_first=True)`` gives it
    (NIfTI through nibabel, reading the header, and all the data when ``load``, so a truncated file fails here and
    not during training: up to 3 axes are spatial, a 4th holds channels; other formats and DICOM series folders
    through MONAI's readers).

    Raises:
        FileNotFoundError: no such file or folder.
        ValueError: the file cannot be read (the reason is given).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} does not exist")
    try:
        if path.is_file() and path.name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            image = nib.load(str(path))
            if load:
                np.asanyarray(image.dataobj)
            shape = tuple(int(s) for s in image.shape)
            return (1, *shape) if len(shape) <= 3 else (shape[-1], *shape[:-1])
        from monai.transforms import LoadImage

        if path.is_dir() and not any(item.is_file() for item in path.iterdir()):
            raise ValueError("it is an empty folder; a DICOM series folder holds one file per slice")
        with warnings.catch_warnings():  # MONAI warns for every file a reader skips: the error below says it once
            warnings.simplefilter("ignore")
            return tuple(int(s) for s in LoadImage(image_only=True, ensure_channel_first=True)(str(path)).shape)
    except Exception as error:  # nibabel/zlib/MONAI reader errors: the file is unreadable
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if path.is_dir() and not isinstance(error, ValueError):
            reason = f"no DICOM series in the folder: {reason}"
        raise ValueError(f"{str(path)!r} cannot be read ({reason})") from error


def _label(value: Any) -> int:
    if isinstance(value, (bool, str, bytes)) or value is None:
        raise TypeError(f"label {value!r} is not an integer class index")
    if isinstance(value, Sequence) and len(value) == 1:
        value = value[0]
    if not isinstance(value, numbers.Real):
        raise TypeError(f"label {value!r} is not an integer class index")
    if not float(value).is_integer() or float(value) < 0:
        raise ValueError(f"label {value!r} is not a non-negative whole-number class index")
    return int(value)


def check_datalist(
    datalist: str | os.PathLike,
    sections: Sequence[str] = ("training", "validation", "test"),
    required: Sequence[str] = ("training", "validation"),
    num_classes: int | None = None,
    spatial_dims: int | None = None,
    in_channels: int | None = None,
    load: bool = True,
    required_keys: Mapping[str, str] | None = None,
) -> DatalistSummary:
    """Check a datalist before any training; see the module docs.

    Args:
        datalist: the datalist JSON (paths relative to its folder, as MONAI's ``load_decathlon_datalist`` reads them).
        sections: the sections to check (those missing from the file are skipped unless ``required``).
        required: sections that must exist and hold at least one entry.
        num_classes: labels must be in ``[0, num_classes)``; None: read from the data (max label + 1).
        spatial_dims: every image must have this many spatial dimensions; None: read from the first image.
        in_channels: every image must have this many channels; None: read from the first image.
        load: read every file completely (catches truncated files) instead of its header only.
        required_keys: map keys (``mask``, ``gaze``, ``anatomy``, ``marker``) every entry of the checked sections
            must have, each with what it is needed for (said in the error).

    Returns:
        A :class:`DatalistSummary`.

    Raises:
        FileNotFoundError: no datalist file.
        DatalistError: the first problem found, in one line naming the section, the entry and the file.
    """
    from .io import load_datalist

    path = Path(datalist).expanduser().absolute()
    if not path.is_file():
        raise FileNotFoundError(f"no datalist at {str(path)!r}.")
    try:
        content = json.loads(path.read_text())
    except ValueError as error:
        raise DatalistError(f"datalist {str(path)!r} is not valid JSON: {error}") from error
    if not isinstance(content, Mapping):
        raise DatalistError(f"datalist {str(path)!r} is not a JSON object of sections.")
    for section in required:
        if not isinstance(content.get(section), list) or not content[section]:
            raise DatalistError(
                f"datalist {str(path)!r}: the {section!r} section is missing or empty; training needs at least one "
                f"{section} entry (sections found: {sorted(k for k, v in content.items() if isinstance(v, list))})."
            )
    counts: dict[str, int] = {}
    labels: dict[str, list[int]] = {}
    shapes: set[tuple[int, ...]] = set()
    keys: set[str] | None = None
    expected: dict[str, int | None] = {"dims": spatial_dims, "channels": in_channels}
    for section in sections:
        if not isinstance(content.get(section), list):
            continue
        entries = load_datalist(path, section)
        counts[section] = len(entries)
        labels[section] = []
        for index, (raw, entry) in enumerate(zip(content[section], entries, strict=True)):
            where = f"datalist {str(path)!r}, {section} entry {index}"
            if not isinstance(raw, Mapping) or not isinstance(raw.get("image"), str):
                raise DatalistError(f"{where}: needs an 'image' path, got {raw!r}.")
            where += f" ({raw['image']})"
            try:
                shape = read_image_shape(entry["image"], load)
            except (FileNotFoundError, ValueError) as error:
                raise DatalistError(f"{where}: the image {error}.") from None
            channels, spatial = shape[0], shape[1:]
            if expected["dims"] is None:
                expected["dims"] = len(spatial)
            if expected["channels"] is None:
                expected["channels"] = channels
            if len(spatial) != expected["dims"]:
                raise DatalistError(
                    f"{where}: the image has spatial shape {spatial}, {len(spatial)} dimension(s); expected "
                    f"{expected['dims']}D images."
                )
            if channels != expected["channels"]:
                raise DatalistError(f"{where}: the image has {channels} channel(s); expected {expected['channels']}.")
            shapes.add(spatial)
            if "label" not in raw:
                raise DatalistError(f"{where}: no 'label'.")
            try:
                label = _label(raw["label"])
            except (TypeError, ValueError) as error:
                raise DatalistError(f"{where}: {error}.") from None
            if num_classes is not None and label >= num_classes:
                raise DatalistError(
                    f"{where}: label {label} is outside the {num_classes} classes 0..{num_classes - 1}."
                )
            labels[section].append(label)
            present = {key for key in _MAP_KEYS if isinstance(raw.get(key), str)}
            for key, purpose in (required_keys or {}).items():
                if key not in present:
                    raise DatalistError(f"{where}: has no {key!r} ({purpose}).")
            for key in sorted(present):
                try:
                    map_shape = read_image_shape(entry[key], load)
                except (FileNotFoundError, ValueError) as error:
                    raise DatalistError(f"{where}: the {key} {error}.") from None
                if map_shape[1:] != spatial:
                    raise DatalistError(
                        f"{where}: the {key} ({raw[key]}) has spatial shape {map_shape[1:]}, the image {spatial}: "
                        "they must match."
                    )
            if section == "training":
                keys = present if keys is None else keys & present
    found = max((max(values) for values in labels.values() if values), default=-1) + 1
    classes = num_classes if num_classes is not None else found
    class_counts = {section: np.bincount(values, minlength=classes).tolist() for section, values in labels.items()}
    missing = [k for k, count in enumerate(class_counts.get("training", [])) if count == 0]
    if missing:
        raise DatalistError(
            f"datalist {str(path)!r}: the training section has no sample of class(es) {missing} "
            f"(labels must be 0..{classes - 1}, every class present in training)."
        )
    warnings = [
        f"the {section} section has no sample of class(es) {absent}"
        for section in ("validation", "test")
        if section in class_counts and (absent := [k for k, c in enumerate(class_counts[section]) if c == 0])
    ]
    return DatalistSummary(
        path=str(path),
        counts=counts,
        num_classes=classes,
        spatial_dims=int(expected["dims"] or 0),
        in_channels=int(expected["channels"] or 0),
        spatial_shapes=sorted(shapes),
        keys=sorted(keys or ()),
        class_counts=class_counts,
        warnings=warnings,
    )
