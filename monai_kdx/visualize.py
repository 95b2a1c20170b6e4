"""Figures: 2D overlays and, for 3D, orthogonal slices through a point of interest.

One place for drawing images with masks and heatmaps on top, shared by the dataset preview and the
explanation figures.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "focus_point",
    "planes",
    "draw_overlay",
    "subplots",
    "save_figure",
    "dataset_preview",
    "datalist_preview",
    "explanation_figure",
]

PLANE_NAMES = ("axial", "coronal", "sagittal")


def focus_point(shape: Sequence[int], focus: np.ndarray | None = None) -> tuple[int, ...]:
    """The point to slice through: the centre of mass of a non-empty binary ``focus``, the maximum
    of a non-binary one, or the array centre.

    Args:
        shape: spatial shape, (H, W) or (H, W, D).
        focus: optional array of that shape (a mask or a heatmap).
    """
    if focus is not None and np.any(focus > 0):
        values = np.asarray(focus, dtype=np.float64)
        if np.isin(values, (0.0, 1.0)).all():
            return tuple(int(round(c)) for c in np.argwhere(values > 0).mean(axis=0))
        return tuple(int(i) for i in np.unravel_index(np.argmax(values), values.shape))
    return tuple(s // 2 for s in shape)


def planes(array: np.ndarray, point: Sequence[int]) -> list[np.ndarray]:
    """2D views of ``array`` through ``point``, oriented for :func:`draw_overlay`: in 2D the array
    itself ((row, column) order, drawn with the origin at the top); in 3D (NIfTI index order) the
    axial (fixed last axis), coronal (fixed second axis) and sagittal (fixed first axis) slices,
    transposed so that they are drawn with the origin at the bottom.

    Args:
        array: (H, W) or (H, W, D).
        point: a spatial index of the same dimensionality.
    """
    if array.ndim == 2:
        return [array]
    i, j, k = point
    return [array[:, :, k].T, array[:, j, :].T, array[i, :, :].T]


def draw_overlay(
    ax: Any,
    image: np.ndarray,
    mask: np.ndarray | None = None,
    heatmap: np.ndarray | None = None,
    title: str | None = None,
    alpha: float = 0.45,
    origin: str = "lower",
) -> None:
    """Draw a 2D image in grey, a heatmap in colour on top, and a mask's outline in red.

    Args:
        ax: a matplotlib axes.
        image: (H, W) image.
        mask: (H, W) binary mask, drawn as a contour.
        heatmap: (H, W) map in any range, min-max scaled for display.
        title: panel title.
        alpha: heatmap opacity.
        origin: ``"upper"`` for 2D images in (row, column) order, ``"lower"`` for slices from :func:`planes`
            of a 3D volume.
    """
    ax.imshow(image, cmap="gray", origin=origin)
    if heatmap is not None and np.ptp(heatmap) > 0:
        scaled = (heatmap - heatmap.min()) / np.ptp(heatmap)
        ax.imshow(np.ma.masked_less(scaled, 0.05), cmap="jet", alpha=alpha, origin=origin, vmin=0, vmax=1)
    if mask is not None and np.any(mask):
        ax.contour(mask.astype(float), levels=[0.5], colors="red", linewidths=0.8)
    if title:
        ax.set_title(title, fontsize=8)
    ax.axis("off")


def dataset_preview(samples: Sequence[Any], path: str | os.PathLike | None = None, per_class: int = 1) -> Any:
    """A grid with ``per_class`` samples of each class: the image, the lesion outline (red) and the
    simulated gaze heatmap; 3D samples are shown as orthogonal slices through the lesion.

    Args:
        samples: :class:`monai_kdx.data.SyntheticSample` objects (2D or 3D).
        path: where to save the PNG (optional).
        per_class: samples shown for each class.

    Returns:
        The matplotlib figure.
    """
    chosen: list[Any] = []
    for label in sorted({s.label for s in samples}):
        chosen += [s for s in samples if s.label == label][:per_class]
    if not chosen:
        raise ValueError("dataset_preview needs at least one sample.")
    views = 1 if chosen[0].image.ndim == 2 else 3
    columns = views + 1
    fig, axes = subplots(len(chosen), columns)
    for row, sample in zip(axes, chosen, strict=True):
        point = focus_point(sample.image.shape, sample.mask if np.any(sample.mask) else sample.gaze)
        images = planes(sample.image, point)
        masks, gazes = planes(sample.mask, point), planes(sample.gaze, point)
        origin = "upper" if views == 1 else "lower"
        draw_overlay(row[0], images[0], title=f"{sample.class_name} (#{sample.index})", origin=origin)
        names = PLANE_NAMES if views == 3 else ("mask + gaze",)
        for ax, name, image, mask, gaze in zip(row[1:], names, images, masks, gazes, strict=True):
            draw_overlay(ax, image, mask, gaze, title=name, origin=origin)
    return save_figure(fig, path)


def subplots(rows: int, columns: int) -> tuple[Any, Any]:
    """A matplotlib figure with ``rows`` × ``columns`` axes of 2.2 inches (non-interactive backend); axes (rows,
    columns) even for one row or column."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.subplots(rows, columns, figsize=(2.2 * columns, 2.2 * rows), squeeze=False)


def save_figure(fig: Any, path: str | os.PathLike | None) -> Any:
    """Lay ``fig`` out tightly and, with a ``path``, write it as PNG and close it; returns the figure."""
    fig.tight_layout()
    if path is not None:
        import matplotlib.pyplot as plt

        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig


def datalist_preview(
    datalist: str | os.PathLike, path: str | os.PathLike | None = None, section: str = "training", per_class: int = 1
) -> Any:
    """:func:`dataset_preview` of a dataset on disk, read back from its files (NIfTI, DICOM series folders: whatever
    MONAI's ``LoadImage`` reads).

    Args:
        datalist: a datalist JSON (e.g. written by :func:`monai_kdx.data.write_dataset`); ``mask`` and ``gaze``
            are drawn where its entries have them.
        path: where to save the PNG (optional).
        section: the datalist section to draw from.
        per_class: samples shown for each class.
    """
    from types import SimpleNamespace

    from monai.transforms import LoadImage

    from monai_kdx.data import load_datalist

    load = LoadImage(image_only=True)

    counts: dict[int, int] = {}
    samples = []
    for index, entry in enumerate(load_datalist(datalist, section)):
        label = int(entry["label"])
        if counts.get(label, 0) >= per_class:
            continue
        counts[label] = counts.get(label, 0) + 1
        image = np.asarray(load(entry["image"]))
        arrays = {  # a datalist without masks or gaze heatmaps (a user's): nothing drawn for them
            key: np.asarray(load(entry[key])) if isinstance(entry.get(key), str) else np.zeros_like(image)
            for key in ("mask", "gaze")
        }
        arrays["image"] = image
        samples.append(SimpleNamespace(**arrays, label=label, class_name=entry.get("class_name", label), index=index))
    return dataset_preview(samples, path, per_class)


def explanation_figure(
    image: np.ndarray,
    maps: Mapping[str, np.ndarray],
    path: str | os.PathLike | None = None,
    mask: np.ndarray | None = None,
    title: str | None = None,
    point: Sequence[int] | None = None,
) -> Any:
    """One PNG of several explanation maps of one image (e.g. the levels of a hierarchical CAM and
    their fusion), each map min-max scaled, with a colour bar. 2D: one overlay per map, side by side. 3D: one
    row per map with the axial, coronal and sagittal slices through one shared point (``point``; by default the
    lesion's centre, or the peak of the last map), so the rows compare the same anatomy.

    Args:
        image: (H, W) or (H, W, D) image (one channel).
        maps: name → map of the image's shape, in drawing order.
        path: where to save the PNG (optional).
        mask: optional (H, W[, D]) lesion mask, drawn as a red outline.
        title: the figure's title (e.g. case, label, prediction).
        point: the 3D point the slices go through.

    Returns:
        The matplotlib figure.

    Raises:
        ValueError: no maps, or a map whose shape differs from the image's.
    """
    import matplotlib.cm as cm
    import matplotlib.colors as colors

    image = np.asarray(image)
    if not maps:
        raise ValueError("explanation_figure needs at least one map.")
    for name, heatmap in maps.items():
        if np.shape(heatmap) != image.shape:
            raise ValueError(f"map {name!r} has shape {np.shape(heatmap)}, the image {image.shape}.")
    if image.ndim == 2:
        fig, axes = subplots(1, len(maps))
        for ax, (name, heatmap) in zip(axes[0], maps.items(), strict=True):
            draw_overlay(ax, image, mask, np.asarray(heatmap), title=name, origin="upper")
    else:
        if point is None:
            last = np.asarray(list(maps.values())[-1], dtype=np.float64)
            point = focus_point(image.shape, mask if mask is not None and np.any(mask) else last)
        fig, axes = subplots(len(maps), 3)
        for row, (name, heatmap) in zip(axes, maps.items(), strict=True):
            heatmap = np.asarray(heatmap, dtype=np.float64)
            views = zip(planes(image, point), planes(heatmap, point), PLANE_NAMES, strict=True)
            masks = planes(mask, point) if mask is not None else [None] * 3
            for ax, (plane, heat, plane_name), plane_mask in zip(row, views, masks, strict=True):
                draw_overlay(ax, plane, plane_mask, heat, title=f"{name} · {plane_name}")
    if title:
        fig.suptitle(title, fontsize=9)
    mappable = cm.ScalarMappable(norm=colors.Normalize(0, 1), cmap="jet")
    fig.tight_layout(rect=(0, 0, 0.86, 0.95 if title else 1))
    bar = fig.add_axes((0.88, 0.15, 0.02, 0.7))
    fig.colorbar(mappable, cax=bar, label="relevance (scaled)")
    if path is not None:
        import matplotlib.pyplot as plt

        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig
