"""The main job's summary: its models side by side (accuracy, size, CPU latency, explanation time, localization,
faithfulness, explanation agreement), written as a report (``report.md``, ``summary.json``, ``summary.png``,
``hierarchy.png``).

Everything here works on data: the trained models, a few test samples, the metrics the stages measured and the
folders of the explanations they saved. Latency and explanation time are measured here, on one CPU thread, batch of
one, median of repeated calls. Agreement is the Pearson correlation between two models' fused CAMs of the same test
images (the NIfTI heatmaps the explain stage saved, paired by file name), averaged over those images.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from monai_kdx.explain import HierarchicalCAM
from monai_kdx.metrics import explanation_agreement
from monai_kdx.networks import count_macs, count_parameters, median_seconds, timed
from monai_kdx.reporting import bar_panels, format_cell, markdown_table, write_json
from monai_kdx.visualize import draw_overlay, save_figure, subplots

__all__ = ["COLUMNS", "agreement_matrix", "summary_markdown", "write_summary"]

COLUMNS = (
    ("model", "model", "{}"),
    ("test_accuracy", "test acc.", "{:.3f}"),
    ("params", "params", "{:,}"),
    ("macs_m", "MACs (M)", "{:.1f}"),
    ("latency_ms", "CPU latency (ms)", "{:.1f}"),
    ("explain_ms", "explanation (ms)", "{:.1f}"),
    ("pointing_game", "pointing game", "{:.3f}"),
    ("relevance_mass", "relevance mass", "{:.3f}"),
    ("deletion_auc", "deletion AUC ↓", "{:.3f}"),
    ("insertion_auc", "insertion AUC ↑", "{:.3f}"),
    ("agreement_teacher", "agreement w/ teacher", "{:.3f}"),
    ("agreement_student", "agreement w/ student", "{:.3f}"),
)
_SUFFIX = "_cam.nii.gz"


def _cam_files(folder: str) -> dict[str, str]:
    if not os.path.isdir(folder):
        return {}
    return {name[: -len(_SUFFIX)]: os.path.join(folder, name) for name in os.listdir(folder) if name.endswith(_SUFFIX)}


def agreement_matrix(folders: Mapping[str, str]) -> dict[tuple[str, str], float]:
    """Mean Pearson correlation of the fused CAMs two models saved for the same images.

    Args:
        folders: model name → folder of ``<case>_cam.nii.gz`` files (the explain bundle's ``SaveImaged``).

    Returns:
        ``{(a, b): mean correlation}`` for every ordered pair of models with common images.
    """
    import nibabel as nib

    files = {name: _cam_files(folder) for name, folder in folders.items()}
    cache: dict[str, torch.Tensor] = {}

    def load(path: str) -> torch.Tensor:
        if path not in cache:
            cache[path] = torch.as_tensor(np.asarray(nib.load(path).dataobj, dtype=np.float32)).squeeze()[None, None]
        return cache[path]

    matrix = {}
    for a in folders:
        for b in folders:
            common = sorted(set(files[a]) & set(files[b]))
            if a == b or not common:
                continue
            values = [float(explanation_agreement(load(files[a][k]), load(files[b][k]))[0]) for k in common]
            matrix[(a, b)] = float(np.nanmean(values))
    return matrix


def _hierarchy_figure(
    image: np.ndarray, mask: np.ndarray, levels: Mapping[str, Mapping[str, np.ndarray]], path: str
) -> None:
    """Rows: models; columns: the image, then each CAM level (shallow → deep) and the fusion, on the slice
    (3D: axial through the lesion's centre) or the image (2D)."""
    if image.ndim == 3:
        depth = int(np.argmax(mask.sum(axis=(0, 1)))) if mask.any() else image.shape[2] // 2
        image, mask = image[..., depth], mask[..., depth]
        levels = {model: {k: v[..., depth] for k, v in maps.items()} for model, maps in levels.items()}
    columns = 1 + max(len(maps) for maps in levels.values())
    fig, axes = subplots(len(levels), columns)
    for row, (model, maps) in zip(axes, levels.items(), strict=True):
        draw_overlay(row[0], image, mask, None, title=f"{model}: image", origin="upper")
        for ax, (name, heatmap) in zip(row[1:], maps.items(), strict=False):
            draw_overlay(ax, image, mask, heatmap, title=f"{model}: {name}", origin="upper")
        for ax in row[1 + len(maps) :]:
            ax.axis("off")
    save_figure(fig, path)


def summary_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The summary table in markdown (missing values as ``–``)."""
    cells = [[format_cell(row.get(key), fmt) for key, _, fmt in COLUMNS] for row in rows]
    return markdown_table([title for _, title, _ in COLUMNS], cells)


def write_summary(
    models: Mapping[str, nn.Module],
    samples: Sequence[Mapping[str, Any]],
    folder: str,
    *,
    accuracies: Mapping[str, float | None],
    explain_metrics: Mapping[str, Mapping[str, float]],
    explanation_folders: Mapping[str, str],
    title: str,
    notes: str = "",
    cam_mode: str = "gradcam",
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Measure and write the summary report of trained, explained models.

    Args:
        models: name → trained network (evaluated on the CPU, eval mode).
        samples: test samples with a lesion (``image`` (C, *spatial), ``label``, ``mask``); the first one is drawn
            in ``hierarchy.png``, all are timed for the explanation time.
        folder: where ``report.md``, ``summary.json``, ``summary.png`` and ``hierarchy.png`` go.
        accuracies: name → test accuracy on the whole test split.
        explain_metrics: name → the explain run's metrics (localization, faithfulness).
        explanation_folders: name → folder of the model's saved CAMs (for the agreement).
        title: the report's title.
        notes: markdown appended to the report (e.g. where MLflow holds the runs).
        cam_mode: the explanation mode timed and drawn.

    Returns:
        The summary rows and ``{"markdown", "json", "plot", "hierarchy"}`` paths.

    Raises:
        ValueError: no sample to explain.
    """
    if not samples:
        raise ValueError("the test split holds no image with a lesion to explain; use more samples.")
    os.makedirs(folder, exist_ok=True)
    agreement = agreement_matrix(explanation_folders)
    first = samples[0]["image"].as_tensor()[None].float()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # comparable figures on a shared machine
    rows, hierarchy = [], {}
    try:
        for name, network in models.items():
            network = network.cpu().eval()
            with torch.no_grad():
                latency = median_seconds(lambda network=network: network(first), repeats=7)
            explainer = HierarchicalCAM(network, mode=cam_mode)
            times = []
            for sample in samples:
                x, label = sample["image"].as_tensor()[None].float(), int(sample["label"])
                explainer.cam(x, label)  # warm-up
                times.append(timed(lambda e=explainer, x=x, label=label: e.cam(x, label))[1])
            result = explainer.cam(first, int(samples[0]["label"]))
            hierarchy[name] = {
                **{f"L{i + 1}": level[0, 0].numpy() for i, level in enumerate(result.levels.values())},
                "fused": result.fused[0, 0].numpy(),
            }
            metrics = explain_metrics.get(name, {})
            rows.append(
                {
                    "model": name,
                    "test_accuracy": accuracies.get(name),
                    "params": count_parameters(network),
                    "macs_m": count_macs(network, tuple(first.shape[1:])) / 1e6,
                    "latency_ms": 1000 * latency,
                    "explain_ms": 1000 * statistics.median(times),
                    **{key: metrics.get(key) for key in ("pointing_game", "relevance_mass", "deletion_auc")},
                    "insertion_auc": metrics.get("insertion_auc"),
                    "agreement_teacher": agreement.get((name, "teacher")),
                    "agreement_student": agreement.get((name, "student")),
                    "cam_levels": list(result.levels),
                }
            )
    finally:
        torch.set_num_threads(threads)
    paths = {
        "markdown": os.path.join(folder, "report.md"),
        "json": os.path.join(folder, "summary.json"),
        "plot": os.path.join(folder, "summary.png"),
        "hierarchy": os.path.join(folder, "hierarchy.png"),
    }
    image = samples[0]["image"].as_tensor()[0].numpy()
    mask = np.asarray(samples[0]["mask"])[0] > 0
    _hierarchy_figure(image, mask, hierarchy, paths["hierarchy"])
    names = [row["model"] for row in rows]
    panels = [
        (label, {"": [float(row.get(key) if row.get(key) is not None else np.nan) for row in rows]})
        for key, label in (
            ("test_accuracy", "test accuracy"),
            ("params", "parameters"),
            ("latency_ms", "CPU latency (ms)"),
            ("explain_ms", "explanation time (ms)"),
            ("pointing_game", "pointing game"),
            ("deletion_auc", "deletion AUC (lower: more faithful)"),
        )
    ]
    bar_panels(panels, names, paths["plot"], panel_size=(3.7, 3.0))
    pairs = {f"{a}↔{b}": value for (a, b), value in agreement.items() if a < b}
    write_json(paths["json"], {"rows": rows, "agreement": pairs})
    listed = "\n".join(f"- {pair}: {value:.3f}" for pair, value in sorted(pairs.items()))
    text = f"""# {title}

Latency and explanation time (hierarchical {cam_mode} at every stage, one forward + one backward) on one CPU thread,
batch of one; localization against the lesion masks; faithfulness by deletion/insertion of the most relevant
voxels; agreement is the mean Pearson correlation of two models' fused maps.

{summary_markdown(rows)}

Explanation agreement (Pearson, mean over the explained test images):

{listed}

![summary](summary.png)

![hierarchical explanations](hierarchy.png)

{notes}
"""
    with open(paths["markdown"], "w") as stream:  # the report lands last: it marks the stage complete
        stream.write(text)
    return rows, paths
