"""Datasets on disk: NIfTI files plus a MONAI-style datalist JSON, written atomically.

Layout of a dataset folder (paths in the datalist are relative to its folder)::

    datalist.json        {"metadata": {...}, "training": [...], "validation": [...], "test": [...]}
    images/case_0000.nii.gz    float32 image, (H, W) or (H, W, D), with the sample's affine
    masks/case_0000.nii.gz     uint8 lesion mask
    anatomy/case_0000.nii.gz   uint8 anatomy mask
    gaze/case_0000.nii.gz      float32 gaze heatmap in [0, 1]
    markers/case_0000.nii.gz   uint8 shortcut-marker mask (only with shortcut_p > 0)

Each datalist entry holds ``image``, ``label``, ``class_name``, ``mask``, ``anatomy``, ``gaze``, ``fixations``
(``[[i, j, (k,) duration_ms], ...]`` in array indices of the image), ``index`` and, with a shortcut, ``marker``
and ``marker_corner``. ``metadata`` identifies the dataset (kind, n, seed, resolved knobs, split fractions,
generator version) and describes it (class names, spatial size, spacing, counts per split and class).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from monai_kdx.data.synthetic import (
    DEFAULT_SPLIT_FRACTIONS,
    GENERATOR_VERSION,
    SPLITS,
    SyntheticSample,
    _check_n,
    assign_splits,
    get_generator,
    iter_samples,
    label_of,
)

__all__ = [
    "DATALIST_NAME",
    "PATH_KEYS",
    "DatasetExistsError",
    "dataset_metadata",
    "write_dataset",
    "ensure_dataset",
    "load_datalist",
]

DATALIST_NAME = "datalist.json"
PATH_KEYS = ("image", "mask", "anatomy", "gaze", "marker")
_FOLDERS = {"image": "images", "mask": "masks", "anatomy": "anatomy", "gaze": "gaze", "marker": "markers"}


class DatasetExistsError(FileExistsError):
    """The output folder already holds a different dataset or unrelated files."""


def dataset_metadata(
    kind: str = "brain-mri-3d",
    n: int = 200,
    seed: int = 0,
    split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    **knobs: Any,
) -> dict[str, Any]:
    """The ``metadata`` entry of a dataset's datalist (JSON-compatible), computed without generating data.

    Two datasets are the same when their metadata are equal.

    Raises:
        ValueError: unknown kind (the message lists the valid ones), ``n`` too small, invalid knobs or seed.
        TypeError: an unknown knob.
    """
    generator_class = get_generator(kind)
    generator = generator_class(**knobs)
    names = list(generator.class_names)
    n = _check_n(n, len(names), kind)
    labels = [label_of(i, seed, len(names)) for i in range(n)]
    splits = assign_splits(labels, seed, split_fractions)
    counts = {split: {name: 0 for name in names} for split in SPLITS}
    for label, split in zip(labels, splits, strict=True):
        counts[split][names[label]] += 1
    metadata = {
        "kind": kind,
        "n": n,
        "seed": int(seed),
        "split_fractions": [float(f) for f in split_fractions],
        "knobs": generator.knobs,
        "generator": f"{generator_class.__module__}.{generator_class.__qualname__}",
        "generator_version": GENERATOR_VERSION,
        "class_names": names,
        "spatial_dims": generator.spatial_dims,
        "spatial_size": generator.knobs["spatial_size"],
        "spacing": [float(s) for s in generator.spacing],
        "counts": counts,
    }
    return json.loads(json.dumps(metadata))  # tuples become lists, as when read back


def _read_metadata(datalist: Path) -> dict[str, Any] | None:
    """The metadata of an existing datalist, or None when the file is not one of ours."""
    try:
        content = json.loads(datalist.read_text())
    except (OSError, ValueError):
        return None
    metadata = content.get("metadata") if isinstance(content, dict) else None
    return metadata if isinstance(metadata, dict) and "kind" in metadata else None


def _missing_files(datalist: Path) -> list[str]:
    content = json.loads(datalist.read_text())
    return [
        entry[key]
        for section in SPLITS
        for entry in content.get(section, [])
        for key in PATH_KEYS
        if key in entry and not (datalist.parent / entry[key]).is_file()
    ]


def _check_destination(out_dir: Path, metadata: dict[str, Any]) -> Path | None:
    """Validate ``out_dir`` before any work; return the datalist path if it already holds this dataset.

    Raises:
        NotADirectoryError: ``out_dir`` or one of its ancestors is a file.
        PermissionError: the folder that would receive ``out_dir`` is not writable.
        DatasetExistsError: ``out_dir`` holds a different dataset or unrelated files.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"cannot write a dataset to {str(out_dir)!r}: it is a file, not a folder.")
    if out_dir.is_dir():
        datalist = out_dir / DATALIST_NAME
        existing = _read_metadata(datalist) if datalist.is_file() else None
        if existing == metadata:
            missing = _missing_files(datalist)
            if missing:
                raise DatasetExistsError(
                    f"{str(out_dir)!r} holds this dataset but {len(missing)} of its files are missing (e.g. "
                    f"{missing[0]!r}); remove the folder to write it again."
                )
            return datalist
        if existing is not None:
            differences = sorted(key for key in {**existing, **metadata} if existing.get(key) != metadata.get(key))
            raise DatasetExistsError(
                f"{str(out_dir)!r} already holds a different dataset (differs in {differences}: found "
                f"kind={existing.get('kind')!r}, n={existing.get('n')!r}, seed={existing.get('seed')!r}); "
                "choose another folder or remove it."
            )
        contents = sorted(p.name for p in out_dir.iterdir())
        if contents:
            raise DatasetExistsError(
                f"{str(out_dir)!r} is not empty and holds no dataset of ours ({len(contents)} entries, e.g. "
                f"{contents[:3]}); choose an empty or new folder."
            )
    ancestor = out_dir.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"cannot create {str(out_dir)!r}: {str(ancestor)!r} is a file, not a folder.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write a dataset to {str(out_dir)!r}: {str(ancestor)!r} is not writable.")
    return None


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import nibabel as nib

    image = nib.Nifti1Image(array, affine)
    image.set_data_dtype(array.dtype)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(path))


def _write_sample(sample: SyntheticSample, folder: Path, case: str) -> dict[str, Any]:
    arrays = {"image": sample.image, "mask": sample.mask, "anatomy": sample.anatomy_mask, "gaze": sample.gaze}
    if sample.marker_mask is not None:
        arrays["marker"] = sample.marker_mask
    entry: dict[str, Any] = {"index": sample.index, "label": sample.label, "class_name": sample.class_name}
    for key, array in arrays.items():
        relative = f"{_FOLDERS[key]}/{case}.nii.gz"
        _save_nifti(array, sample.affine, folder / relative)
        entry[key] = relative
    if sample.marker_corner is not None:
        entry["marker_corner"] = sample.marker_corner
    entry["fixations"] = sample.fixations
    return entry


def write_dataset(
    out_dir: str | os.PathLike[str],
    kind: str = "brain-mri-3d",
    n: int = 200,
    seed: int = 0,
    progress: bool = True,
    split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    **knobs: Any,
) -> Path:
    """Generate a dataset and write it to ``out_dir`` (NIfTI files and ``datalist.json``).

    All checks run before any work. The dataset is written to a temporary sibling folder, which is renamed to
    ``out_dir`` at the end, so ``out_dir`` never holds half a dataset; on any error (KeyboardInterrupt
    included) the temporary folder is removed. If ``out_dir`` already holds the same dataset (same metadata),
    nothing is written.

    Args:
        out_dir: the dataset folder to create (it may exist if it is empty).
        kind: a registered dataset kind (see :func:`monai_kdx.data.synthetic.get_generator`).
        n: number of samples, at least the number of classes.
        seed: non-negative dataset seed.
        progress: show a tqdm progress bar.
        split_fractions: (training, validation, test) fractions.
        knobs: keyword arguments of the kind's generator (see :class:`monai_kdx.data.SyntheticGenerator`).

    Returns:
        The path of ``datalist.json``.

    Raises:
        ValueError: unknown kind, ``n`` too small, invalid seed, fractions or knobs.
        NotADirectoryError: ``out_dir`` or an ancestor is a file.
        PermissionError: the parent folder is not writable.
        DatasetExistsError: ``out_dir`` holds a different dataset or unrelated files.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    metadata = dataset_metadata(kind, n, seed, split_fractions, **knobs)
    existing = _check_destination(out_dir, metadata)
    if existing is not None:
        return existing

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        temporary.chmod(0o777 & ~umask)  # mkdtemp makes a private folder; the dataset gets the usual mode
        for key in PATH_KEYS:
            if key != "marker" or metadata["knobs"]["shortcut_p"] > 0:
                (temporary / _FOLDERS[key]).mkdir()
        width = max(4, len(str(metadata["n"] - 1)))
        sections: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
        for sample in iter_samples(kind, n, seed, progress, split_fractions, **knobs):
            sections[sample.split].append(_write_sample(sample, temporary, f"case_{sample.index:0{width}d}"))
        datalist = {"metadata": metadata, **sections}
        (temporary / DATALIST_NAME).write_text(json.dumps(datalist, indent=1))
        if out_dir.is_dir():
            out_dir.rmdir()  # empty (checked above)
        try:
            os.rename(temporary, out_dir)
        except OSError:
            if _read_metadata(out_dir / DATALIST_NAME) != metadata:  # not a concurrent writer of the same data
                raise
            shutil.rmtree(temporary, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return out_dir / DATALIST_NAME


def ensure_dataset(
    out_dir: str | os.PathLike[str],
    kind: str = "brain-mri-3d",
    n: int = 200,
    seed: int = 0,
    **knobs: Any,
) -> str:
    """Write the dataset if ``out_dir`` does not hold it yet (quietly); return the datalist path as a string.

    Meant for bundle configs: ``"$monai_kdx.data.ensure_dataset(@dataset_dir, 'brain-mri-3d', 200, 0)"``.
    Arguments and errors as in :func:`write_dataset`.
    """
    return str(write_dataset(out_dir, kind=kind, n=n, seed=seed, progress=False, **knobs))


def load_datalist(datalist_path: str | os.PathLike[str], section: str = "training") -> list[dict[str, Any]]:
    """Read one section of a datalist and resolve its file paths.

    Unlike :func:`monai.data.load_decathlon_datalist`, which resolves ``image`` only, every file key
    (``image``, ``mask``, ``anatomy``, ``gaze``, ``marker``) becomes an absolute path.

    Args:
        datalist_path: path of ``datalist.json``.
        section: a list-valued section, e.g. ``"training"``, ``"validation"`` or ``"test"``.

    Returns:
        The section's entries (copies) with absolute paths as strings.

    Raises:
        FileNotFoundError: no such datalist.
        ValueError: not a datalist, or unknown section (the message lists the valid ones).
    """
    path = Path(datalist_path).expanduser().absolute()
    try:
        content = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{str(path)!r} is not a JSON datalist: {error}") from error
    if not isinstance(content, dict):
        raise ValueError(f"{str(path)!r} is not a datalist (a JSON object of sections).")
    sections = sorted(key for key, value in content.items() if isinstance(value, list))
    if section not in sections:
        raise ValueError(f"unknown datalist section {section!r} in {str(path)!r}; valid sections: {sections}.")
    entries = []
    for entry in content[section]:
        entry = dict(entry)
        for key in PATH_KEYS:
            if isinstance(entry.get(key), str):
                entry[key] = str((path.parent / entry[key]).resolve())
        entries.append(entry)
    return entries
