"""The main job's summary: its models side by side (accuracy, size, CPU latency, explanation time, localization,
faithfulness, explanation agreement), written as a report (``report.md``, ``summary.json``, ``summary.png``,
``hierarchy.png``).

Everything here works on data: the trained models, a few test samples, the per-case tables and the folders of the
explanations the explain stage saved, and how each training ended. Accuracy, pointing game and agreement come with
95% bootstrap intervals over the cases behind them, and a random-map row gives the chance level of every explanation
score. Latency and explanation time are measured here, on one CPU thread, batch of one, median of repeated calls.
Agreement is the Pearson correlation between two models' fused maps of the same test case (the NIfTI heatmaps the
explain stage saved, paired by case), averaged over the cases.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from monai_kdx.explain import CAM_MODES, HierarchicalCAM
from monai_kdx.metrics import bootstrap_interval, explanation_agreement
from monai_kdx.networks import count_macs, count_parameters, median_seconds, timed
from monai_kdx.reporting import bar_panels, format_cell, markdown_table, write_json
from monai_kdx.transforms import HierarchicalExplanationd
from monai_kdx.visualize import draw_overlay, save_figure, subplots

__all__ = ["COLUMNS", "RANDOM_ROW", "agreement_matrix", "data_notes", "summary_markdown", "write_summary"]

RANDOM_ROW = "random map"
"""The row of a uniform random map: the chance level of the localization and faithfulness scores."""

# key, title, format; "±" marks a column shown with its 95% bootstrap interval (keys <key>_low, <key>_high)
COLUMNS = (
    ("model", "model", "{}"),
    ("test_accuracy", "test acc. [95% CI]", "±"),
    ("params", "params", "{:,}"),
    ("macs_m", "MACs (M)", "{:.1f}"),
    ("latency_ms", "CPU latency (ms)", "{:.1f}"),
    ("explain_ms", "explanation (ms)", "{:.1f}"),
    ("pointing_game", "pointing game [95% CI]", "±"),
    ("relevance_mass", "relevance mass", "{:.3f}"),
    ("deletion_auc", "deletion AUC ↓", "{:.3f}"),
    ("insertion_auc", "insertion AUC ↑", "{:.3f}"),
    ("agreement_teacher", "agreement w/ teacher [95% CI]", "±"),
    ("agreement_student", "agreement w/ student [95% CI]", "±"),
    ("gaze_kl", "KL to gaze ↓", "{:.3f}"),
    ("gaze_nss", "NSS at gaze ↑", "{:.3f}"),
    ("training", "epochs (stopped by)", "{}"),
)
_SUFFIX = "_cam.nii.gz"


def _cam_files(folder: str) -> dict[str, str]:
    if not os.path.isdir(folder):
        return {}
    return {name[: -len(_SUFFIX)]: os.path.join(folder, name) for name in os.listdir(folder) if name.endswith(_SUFFIX)}


def _load_map(path: str) -> torch.Tensor:
    """A saved NIfTI map as (1, 1, *spatial) float32."""
    import nibabel as nib

    return torch.as_tensor(np.asarray(nib.load(path).dataobj, dtype=np.float32)).squeeze()[None, None]


def gaze_scores(folder: str, gaze: Mapping[str, tuple[str, Sequence[Sequence[float]]]]) -> dict[str, list[float]]:
    """How close a model's saved maps are to where the (simulated) radiologists looked, per case: the KL divergence
    to the gaze heatmap and the NSS at the fixations (Bylinskii et al.; :mod:`monai_kdx.metrics.saliency`).

    Args:
        folder: the model's ``<case>_cam.nii.gz`` maps.
        gaze: case → (its gaze heatmap file, its fixations in array indices ``[[i, j, (k,) duration], ...]``).

    Returns:
        ``{"kl": [...], "nss": [...]}`` over the cases with both a map and a gaze heatmap.
    """
    from monai_kdx.data.gaze import fixations_to_binary_map
    from monai_kdx.metrics import saliency_kl, saliency_nss

    files = _cam_files(folder)
    scores: dict[str, list[float]] = {"kl": [], "nss": []}
    for case, (heatmap_path, fixations) in gaze.items():
        if case not in files:
            continue
        saliency, heatmap = _load_map(files[case]), _load_map(heatmap_path)
        if float(heatmap.sum()) <= 0 or saliency.shape != heatmap.shape:
            continue
        spatial = tuple(heatmap.shape[2:])
        points = [point[: len(spatial)] for point in fixations]
        binary = torch.as_tensor(fixations_to_binary_map(points, spatial), dtype=torch.float32)[None, None]
        scores["kl"].append(float(saliency_kl(saliency, heatmap)[0]))
        if float(binary.sum()) > 0:
            scores["nss"].append(float(saliency_nss(saliency, binary)[0]))
    return scores


def agreement_matrix(folders: Mapping[str, str]) -> dict[tuple[str, str], list[float]]:
    """Per-case Pearson correlation of the fused maps two models saved for the same cases.

    Args:
        folders: model name → folder of ``<case>_cam.nii.gz`` files (the explain bundle's ``SaveImaged``).

    Returns:
        ``{(a, b): [correlation of each common case]}`` for every ordered pair of models with common cases.
    """
    files = {name: _cam_files(folder) for name, folder in folders.items()}
    cache: dict[str, torch.Tensor] = {}

    def load(path: str) -> torch.Tensor:
        if path not in cache:
            cache[path] = _load_map(path)
        return cache[path]

    matrix = {}
    for a in folders:
        for b in folders:
            common = sorted(set(files[a]) & set(files[b]))
            if a == b or not common:
                continue
            matrix[(a, b)] = [float(explanation_agreement(load(files[a][k]), load(files[b][k]))[0]) for k in common]
    return matrix


def data_notes(datalist: str | os.PathLike) -> str:
    """The report's account of the data: cases and classes per section, and a warning line for each problem that
    does not stop training (a class with no case in the validation or test split: its accuracy is not measured).

    Args:
        datalist: the datalist JSON the models were trained and tested on (checked by
            :func:`monai_kdx.data.check_datalist`, headers only).

    Returns:
        Markdown: one line on the data, then one ``- **warning**: ...`` line per warning.
    """
    from monai_kdx.data import check_datalist

    summary = check_datalist(datalist, load=False)
    sections = "; ".join(
        f"{section} {summary.counts[section]} (per class {summary.class_counts.get(section, [])})"
        for section in summary.counts
    )
    lines = [f"Data: `{summary.path}`, {summary.num_classes} classes, {summary.spatial_dims}D: {sections}."]
    lines += [f"- **warning**: {warning}." for warning in summary.warnings]
    return "\n".join(lines)


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


def _cell(row: Mapping[str, Any], key: str, fmt: str) -> str:
    if fmt != "±":
        return format_cell(row.get(key), fmt)
    value = format_cell(row.get(key), "{:.3f}")
    low, high = row.get(f"{key}_low"), row.get(f"{key}_high")
    interval = f" [{format_cell(low, '{:.2f}')}, {format_cell(high, '{:.2f}')}]" if low is not None else ""
    return value + (interval if value != "–" else "")


def summary_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The summary table in markdown (missing values as ``–``; intervals in brackets)."""
    cells = [[_cell(row, key, fmt) for key, _, fmt in COLUMNS] for row in rows]
    return markdown_table([title for _, title, _ in COLUMNS], cells)


def _with_interval(row: dict[str, Any], key: str, values: Sequence[float], seed: int = 0) -> None:
    interval = bootstrap_interval(values, seed=seed)
    row.update({key: interval["value"], f"{key}_low": interval["low"], f"{key}_high": interval["high"]})
    row[f"{key}_n"] = interval["n"]


def write_summary(
    models: Mapping[str, nn.Module],
    samples: Sequence[Mapping[str, Any]],
    folder: str,
    *,
    case_tables: Mapping[str, Sequence[Mapping[str, Any]]],
    explain_metrics: Mapping[str, Mapping[str, float]],
    explanation_folders: Mapping[str, str],
    training: Mapping[str, Mapping[str, Any]],
    gaze: Mapping[str, tuple[str, Sequence[Sequence[float]]]] | None = None,
    title: str,
    notes: str = "",
    method: str = "layercam",
    smoothing: float = 0.0,
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Measure and write the summary report of trained, explained models.

    Args:
        models: name → trained network (evaluated on the CPU, eval mode).
        samples: test samples (``image`` (C, *spatial), ``label``, and ``mask`` when the data has lesion masks: then
            samples with a lesion); the first one is drawn in ``hierarchy.png``, all are timed for the explanation
            time.
        folder: where ``report.md``, ``summary.json``, ``summary.png`` and ``hierarchy.png`` go.
        case_tables: name → the explain run's per-case rows (:func:`monai_kdx.handlers.read_case_table`: ``correct``,
            ``cam_pointing_game``, ``cam_random_pointing_game``, ...), for the accuracy, the pointing game and their
            intervals.
        explain_metrics: name → the explain run's metrics (means of the faithfulness scores).
        training: name → how its training ended (``epochs_run``, ``stop_reason``; see
            :class:`monai_kdx.handlers.TrainingStop`).
        gaze: case → (gaze heatmap file, fixations): each model's maps are also scored against where the
            radiologists looked (:func:`gaze_scores`; KL and NSS with their intervals). None: not scored.
        explanation_folders: name → folder of the model's saved CAMs (for the agreement).
        title: the report's title.
        notes: markdown appended to the report (e.g. which explanation and why, where MLflow holds the runs).
        method: the explanation timed (a CAM mode or a registered explainer); ``hierarchy.png`` draws the CAM levels
            of this mode, or of LayerCAM for a pixel attribution method.
        smoothing: the Gaussian σ in voxels over a pixel attribution's maps
            (:class:`~monai_kdx.transforms.HierarchicalExplanationd`), timed with it.

    Returns:
        The summary rows and ``{"markdown", "json", "plot", "hierarchy"}`` paths.

    Raises:
        ValueError: no sample to explain.
    """
    if not samples:
        raise ValueError("the test split holds no image with a lesion to explain; use more samples.")
    first_table = next(iter(case_tables.values()), [])
    n_test = len(first_table)
    n_lesion = sum(1 for case in first_table if np.isfinite(case.get("cam_pointing_game", np.nan)))
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
            explain = HierarchicalExplanationd("image", network, mode=method, target_key="label", smoothing=smoothing)
            times = []
            for sample in samples:
                explain(sample)  # warm-up
                times.append(timed(lambda e=explain, sample=sample: e(sample))[1])
            levels_mode = method if method in CAM_MODES else "layercam"
            result = HierarchicalCAM(network, mode=levels_mode).cam(first, int(samples[0]["label"]))
            hierarchy[name] = {
                **{f"L{i + 1}": level[0, 0].numpy() for i, level in enumerate(result.levels.values())},
                "fused": result.fused[0, 0].numpy(),
            }
            metrics, cases = explain_metrics.get(name, {}), case_tables.get(name, [])
            stopped = training.get(name) or {}
            row: dict[str, Any] = {
                "model": name,
                "params": count_parameters(network),
                "macs_m": count_macs(network, tuple(first.shape[1:])) / 1e6,
                "latency_ms": 1000 * latency,
                "explain_ms": 1000 * statistics.median(times),
                "relevance_mass": metrics.get("relevance_mass"),
                "deletion_auc": metrics.get("deletion_auc"),
                "insertion_auc": metrics.get("insertion_auc"),
                "training": f"{stopped['epochs_run']} ({stopped['stop_reason']})" if stopped else None,
                "cam_levels": list(result.levels),
            }
            _with_interval(row, "test_accuracy", [case["correct"] for case in cases])
            if gaze:
                scores = gaze_scores(explanation_folders[name], gaze)
                _with_interval(row, "gaze_kl", scores["kl"])
                _with_interval(row, "gaze_nss", scores["nss"])
            if n_lesion:  # localization only where there are lesion masks
                _with_interval(row, "pointing_game", [case["cam_pointing_game"] for case in cases])
            for other in ("teacher", "student"):
                _with_interval(row, f"agreement_{other}", agreement.get((name, other), []))
            rows.append(row)
    finally:
        torch.set_num_threads(threads)
    reference = next(iter(case_tables.values()), [])  # the random map of the same cases (seeded: one map a case)
    random_row: dict[str, Any] = {
        "model": RANDOM_ROW,
        "deletion_auc": next(iter(explain_metrics.values()), {}).get("random_deletion_auc"),
        "insertion_auc": next(iter(explain_metrics.values()), {}).get("random_insertion_auc"),
    }
    if n_lesion:
        random_row["relevance_mass"] = float(np.nanmean([case["cam_random_relevance_mass"] for case in reference]))
        _with_interval(random_row, "pointing_game", [case["cam_random_pointing_game"] for case in reference])
    rows.append(random_row)
    paths = {
        "markdown": os.path.join(folder, "report.md"),
        "json": os.path.join(folder, "summary.json"),
        "plot": os.path.join(folder, "summary.png"),
        "hierarchy": os.path.join(folder, "hierarchy.png"),
    }
    image = samples[0]["image"].as_tensor()[0].numpy()
    mask = np.asarray(samples[0]["mask"])[0] > 0 if "mask" in samples[0] else np.zeros(image.shape, bool)
    _hierarchy_figure(image, mask, hierarchy, paths["hierarchy"])
    modelled = [row for row in rows if row["model"] != RANDOM_ROW]
    names = [row["model"] for row in modelled]
    panels = [
        (label, {"": [float(row.get(key) if row.get(key) is not None else np.nan) for row in modelled]})
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
    pairs = {f"{a}↔{b}": bootstrap_interval(values) for (a, b), values in agreement.items() if a < b}
    write_json(paths["json"], {"rows": rows, "agreement": pairs})
    listed = "\n".join(
        f"- {pair}: {value['value']:.3f} [{value['low']:.2f}, {value['high']:.2f}] over {value['n']} cases"
        for pair, value in sorted(pairs.items())
    )
    localization = (
        f"localization against the lesion masks ({n_lesion} test cases with a lesion)"
        if n_lesion
        else "no localization (no lesion masks)"
    )
    smoothed = (
        f" (its magnitude smoothed by a Gaussian of σ = {smoothing:g} voxels)"
        if smoothing and method not in CAM_MODES
        else ""
    )
    text = f"""# {title}

The explanation is {method}{smoothed}: its maps are what the scores below measure. Latency
and explanation time on one CPU thread, batch of one; {localization}; faithfulness by
deletion/insertion of the most relevant voxels; agreement is the mean Pearson correlation of two models' maps.
Accuracy over {n_test} test cases. In brackets: 95% bootstrap intervals. The "{RANDOM_ROW}" row scores a uniform
random map of the same cases: the chance level. "epochs (stopped by)": how many epochs the model's training ran and
why it stopped (a validation plateau, the epoch cap, or the time budget).

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
