"""The main job's summary: teacher, distilled student, pruned student and saliency-guided student side by
side (accuracy, size, CPU latency, explanation time, localization, faithfulness, explanation agreement),
written as a report (``report.md``, ``summary.json``, ``summary.png``, ``hierarchy.png``).

Test accuracy comes from each model's training stage (the whole test split); localization and
faithfulness from the explain stage's bundle runs (one per model, on the explained test images).
Latency and explanation time are measured here, on one CPU thread, batch of one, median of repeated
calls. Agreement is the Pearson correlation between two models' fused Grad-CAMs of the same test
images (the NIfTI heatmaps the explain stage saved), averaged over those images.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from .runner import Pipeline

__all__ = ["build_models", "median_seconds", "agreement_matrix", "summary_markdown", "write_summary"]

TRAINING_STAGE = {"teacher": "teacher", "student": "distill", "pruned": "prune", "saliency": "saliency"}
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


def _parser(pipeline: Pipeline, configs: Sequence[str]) -> Any:
    from monai.bundle import ConfigParser

    from .bundles import bundle_path

    root = bundle_path(pipeline.bundle)
    parser = ConfigParser()
    parser.read_config([str(root / "configs" / name) for name in configs])
    parser.update({**pipeline.bundle_settings("explain", "summary"), "bundle_root": str(root)})
    return parser


def build_models(pipeline: Pipeline) -> dict[str, torch.nn.Module]:
    """The four trained models of a pipeline, on the CPU in eval mode (weights from the stages' files)."""
    from monai_kdx.networks import load_weights
    from monai_kdx.pruning import load_pruned

    from .runner import PRUNED_FILE, SALIENCY_CKPT, STUDENT_CKPT, TEACHER_CKPT

    def built(configs: Sequence[str], key: str, checkpoint: str) -> torch.nn.Module:
        network = _parser(pipeline, configs).get_parsed_content(key)
        return load_weights(network.cpu(), pipeline.path(checkpoint)).eval()

    return {
        "teacher": built(["train_teacher.yaml"], "network", TEACHER_CKPT),
        "student": built(["train_teacher.yaml", "distill.yaml"], "network", STUDENT_CKPT),
        "pruned": load_pruned(pipeline.path(PRUNED_FILE)).cpu().eval(),
        "saliency": built(["train_teacher.yaml", "saliency_train.yaml"], "network", SALIENCY_CKPT),
    }


def median_seconds(function: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``function()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _cam_files(folder: str) -> dict[str, str]:
    suffix = "_cam.nii.gz"
    return {name[: -len(suffix)]: os.path.join(folder, name) for name in os.listdir(folder) if name.endswith(suffix)}


def agreement_matrix(folders: Mapping[str, str]) -> dict[tuple[str, str], float]:
    """Mean Pearson correlation of the fused CAMs two models saved for the same images.

    Args:
        folders: model name → folder of ``<image>_cam.nii.gz`` files (the explain bundle's ``SaveImaged``).

    Returns:
        ``{(a, b): mean correlation}`` for every ordered pair of models with common images.
    """
    import nibabel as nib

    from monai_kdx.metrics import explanation_agreement

    files = {name: _cam_files(folder) for name, folder in folders.items()}
    cache: dict[str, torch.Tensor] = {}

    def load(path: str) -> torch.Tensor:
        if path not in cache:
            cache[path] = torch.as_tensor(np.asarray(nib.load(path).dataobj, dtype=np.float32)).squeeze()[None, None]
        return cache[path]

    matrix = {}
    names = list(folders)
    for a in names:
        for b in names:
            common = sorted(set(files[a]) & set(files[b]))
            if a == b or not common:
                continue
            values = [float(explanation_agreement(load(files[a][k]), load(files[b][k]))[0]) for k in common]
            matrix[(a, b)] = float(np.nanmean(values))
    return matrix


def _test_samples(pipeline: Pipeline, limit: int) -> list[dict[str, Any]]:
    """Up to ``limit`` test samples with a lesion (image, label, mask), preprocessed as in explain.yaml."""
    parser = _parser(pipeline, ["train_teacher.yaml", "explain.yaml"])
    transform = parser.get_parsed_content("validate#preprocessing")
    samples = []
    for item in parser.get_parsed_content("test#dataset").data:
        sample = transform(item)
        if float(sample["mask"].sum()) > 0:
            samples.append(sample)
        if len(samples) == limit:
            break
    return samples


def _hierarchy_figure(
    image: np.ndarray, mask: np.ndarray, levels: Mapping[str, Mapping[str, np.ndarray]], path: str
) -> None:
    """Rows: models; columns: the image, then each CAM level (shallow → deep) and the fusion, on the slice
    (3D: axial through the lesion's centre) or the image (2D)."""
    from monai_kdx.visualize import _finish, _subplots, draw_overlay

    if image.ndim == 3:
        depth = int(np.argmax(mask.sum(axis=(0, 1)))) if mask.any() else image.shape[2] // 2
        image, mask = image[..., depth], mask[..., depth]
        levels = {model: {k: v[..., depth] for k, v in maps.items()} for model, maps in levels.items()}
    columns = 1 + max(len(maps) for maps in levels.values())
    fig, axes = _subplots(len(levels), columns)
    for row, (model, maps) in zip(axes, levels.items(), strict=True):
        draw_overlay(row[0], image, mask, None, title=f"{model}: image", origin="upper")
        for ax, (name, heatmap) in zip(row[1:], maps.items(), strict=False):
            draw_overlay(ax, image, mask, heatmap, title=f"{model}: {name}", origin="upper")
        for ax in row[1 + len(maps) :]:
            ax.axis("off")
    _finish(fig, path)


def _summary_plot(rows: Sequence[Mapping[str, Any]], path: str) -> None:
    from monai_kdx.visualize import _finish, _subplots

    panels = [
        ("test_accuracy", "test accuracy"),
        ("params", "parameters"),
        ("latency_ms", "CPU latency (ms)"),
        ("explain_ms", "explanation time (ms)"),
        ("pointing_game", "pointing game"),
        ("deletion_auc", "deletion AUC (lower: more faithful)"),
    ]
    fig, axes = _subplots(2, 3)
    fig.set_size_inches(11, 6)
    names = [row["model"] for row in rows]
    colors = ["#4c72b0", "#55a868", "#c44e52", "#8172b2"][: len(rows)]
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        values = [float(row.get(key, np.nan)) for row in rows]
        ax.bar(names, values, color=colors)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=8)
    _finish(fig, path)


def summary_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The summary table in markdown (missing values as ``–``)."""
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = []
        for key, _, fmt in COLUMNS:
            value = row.get(key)
            missing = value is None or (isinstance(value, float) and not np.isfinite(value))
            cells.append("–" if missing else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_summary(
    pipeline: Pipeline, folder: str, explain_metrics: Mapping[str, Mapping[str, float]], n_timed: int = 3
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Measure and write the summary report of a pipeline whose training stages and explanations are done.

    Args:
        pipeline: the pipeline (its output folder holds the four models and their explanations).
        folder: where ``report.md``, ``summary.json``, ``summary.png`` and ``hierarchy.png`` go.
        explain_metrics: model name → the explain bundle run's metrics (test accuracy, localization,
            faithfulness).
        n_timed: test images (with a lesion) timed for the explanation time.

    Returns:
        The summary rows and ``{"markdown", "json", "plot", "hierarchy"}`` paths.
    """
    from tqdm.auto import tqdm

    from monai_kdx.explain import HierarchicalCAM
    from monai_kdx.networks import count_macs, count_parameters

    os.makedirs(folder, exist_ok=True)
    models = build_models(pipeline)
    samples = _test_samples(pipeline, n_timed)
    if not samples:
        raise ValueError("the test split holds no image with a lesion to explain; use more samples.")
    agreement = agreement_matrix(
        {name: pipeline.path(os.path.join("explanations", name)) for name in models}
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # comparable figures on a shared machine
    rows, hierarchy = [], {}
    try:
        for name, network in tqdm(models.items(), desc="summary", total=len(models)):
            image = samples[0]["image"].as_tensor()[None].float()
            with torch.no_grad():
                latency = median_seconds(lambda network=network, image=image: network(image), repeats=7)
            explainer = HierarchicalCAM(network)
            times = []
            for sample in samples:
                x, label = sample["image"].as_tensor()[None].float(), int(sample["label"])
                times.append(median_seconds(lambda e=explainer, x=x, label=label: e.cam(x, label), repeats=1))
            result = explainer.cam(samples[0]["image"].as_tensor()[None].float(), int(samples[0]["label"]))
            hierarchy[name] = {
                **{f"L{i + 1}": level[0, 0].numpy() for i, level in enumerate(result.levels.values())},
                "fused": result.fused[0, 0].numpy(),
            }
            metrics = explain_metrics.get(name, {})
            trained = pipeline.state["stages"].get(TRAINING_STAGE[name], {}).get("metrics", {})
            rows.append(
                {
                    "model": name,
                    "test_accuracy": trained.get("test_accuracy", metrics.get("test_accuracy")),
                    "params": count_parameters(network),
                    "macs_m": count_macs(network, tuple(samples[0]["image"].shape)) / 1e6,
                    "latency_ms": 1000 * latency,
                    "explain_ms": 1000 * statistics.median(times),
                    "pointing_game": metrics.get("pointing_game"),
                    "relevance_mass": metrics.get("relevance_mass"),
                    "deletion_auc": metrics.get("deletion_auc"),
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
    _summary_plot(rows, paths["plot"])
    pairs = {f"{a}↔{b}": value for (a, b), value in agreement.items() if a < b}
    with open(paths["json"], "w") as stream:
        json.dump({"rows": rows, "agreement": pairs}, stream, indent=2)
    with open(paths["markdown"], "w") as stream:
        stream.write(_report_text(pipeline, rows, pairs))
    # the report lands last: its presence marks the explain stage's output as complete
    return rows, paths


def _report_text(pipeline: Pipeline, rows: Sequence[Mapping[str, Any]], pairs: Mapping[str, float]) -> str:
    agreement = "\n".join(f"- {pair}: {value:.3f}" for pair, value in sorted(pairs.items()))
    return f"""# monai_kdx pipeline report: {pipeline.bundle}

Teacher → distilled student → relevance-pruned student, and a saliency-guided student, on the test split.
Latency and explanation time (hierarchical Grad-CAM at every stage, one forward + one backward) on one
CPU thread, batch of one; localization against the lesion masks; faithfulness by deletion/insertion of
the most relevant voxels; agreement is the mean Pearson correlation of two models' fused Grad-CAMs.

{summary_markdown(rows)}

Explanation agreement (Pearson, mean over the test split):

{agreement}

![summary](summary.png)

![hierarchical explanations](hierarchy.png)

MLflow: `{pipeline.tracking_uri}`, experiment `{pipeline.experiment_name}`, parent run
`{pipeline.state["parent_run_id"]}`.
"""
