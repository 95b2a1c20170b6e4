"""Compare every explanation method on the same network and images: localization, faithfulness, the
randomization sanity check and time per image, as rows, a markdown table and a PNG plot.

One row per method (any name registered in :data:`monai_kdx.registry.EXPLAINERS`), computed on (B, 1, H, W)
or (B, 1, H, W, D) images with their lesion masks and labels:

- ``pointing_game`` (↑): share of images whose map peaks inside the lesion mask (dilated by ``tolerance``);
- ``relevance_mass`` (↑): share of the positive relevance that falls inside the mask;
- ``deletion_auc`` (↓) and ``insertion_auc`` (↑): area under the class probability while the most relevant
  positions are removed from (inserted into) the image;
- ``randomization_similarity`` (↓): absolute Spearman rank correlation between the maps of the trained network
  and of the network whose stages are re-initialized from the head down (Adebayo et al.); a method that keeps a
  high similarity does not depend on what the network learned;
- ``seconds_per_image``: median wall time of one ``attribute`` call on one image.

A ``random`` baseline row (uniform noise maps) is added by default: localization and faithfulness are only
meaningful relative to it.

:func:`monai_kdx.apps.compare_explanations.run_comparison` is the application behind ``monai-kdx
compare-explanations``: it generates a dataset kind, trains the bundles' teacher briefly (or loads a checkpoint) and
calls :func:`compare_explainers` on test images with lesions.

Example:
    >>> rows = compare_explainers(network, images, masks, labels, methods=["gradcam", "occlusion"])
    >>> comparison = ExplainerComparison("chest-xray-2d", rows)
    >>> write_report([comparison], "runs/compare")  # report.md, report.png, report.json
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monai_kdx.networks import class_indices, num_classes_of, timed, unwrap_network
from monai_kdx.registry import EXPLAINERS
from monai_kdx.reporting import bar_panels, markdown_table, write_json

from .base import build_explainer, check_inputs
from .cam import stage_layers

__all__ = [
    "METRICS",
    "RANDOM_BASELINE",
    "ExplainerComparison",
    "check_methods",
    "compare_explainers",
    "comparison_markdown",
    "default_options",
    "plot_comparison",
    "write_report",
]

RANDOM_BASELINE = "random"

# metric key -> (column title, higher is better)
METRICS: dict[str, tuple[str, bool]] = {
    "pointing_game": ("pointing game ↑", True),
    "relevance_mass": ("relevance mass ↑", True),
    "deletion_auc": ("deletion AUC ↓", False),
    "insertion_auc": ("insertion AUC ↑", True),
    "randomization_similarity": ("randomization similarity ↓", False),
    "seconds_per_image": ("s / image ↓", False),
}


def check_methods(methods: Sequence[str] | None) -> list[str]:
    """The method names to compare (``None``: every registered explainer), checked against the registry.

    Raises:
        ValueError: an empty list, a duplicate or an unknown name (the valid names are listed).
    """
    valid = EXPLAINERS.names()
    if methods is None:
        return list(valid)
    if isinstance(methods, str):
        methods = [methods]
    methods = list(methods)
    if not methods:
        raise ValueError(f"no methods to compare; choose among {valid}.")
    unknown = [m for m in methods if m not in valid]
    if unknown:
        raise ValueError(f"unknown explanation method(s) {unknown}; valid methods: {valid}.")
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods {methods} hold duplicates.")
    return methods


def default_options(spatial_dims: int, quick: bool = False) -> dict[str, dict[str, Any]]:
    """Per-method options that bound the cost of a comparison (fewer integration steps and noisy samples
    than the methods' defaults, a coarse occlusion grid: 8 cells per side in 2D, 4 in 3D)."""
    return {
        "integrated_gradients": {"n_steps": 4 if quick else 16, "internal_batch_size": 16},
        "smoothgrad": {"n_samples": 2 if quick else 8, "seed": 0},
        "gradient_shap": {"n_samples": 2 if quick else 8, "seed": 0},
        "occlusion": {"grid": 4 if quick or spatial_dims == 3 else 8, "batch_size": 64},
    }


def _check_data(
    network: nn.Module, images: torch.Tensor, masks: Any, labels: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images, (B, 1, *spatial) binary masks and (B,) labels, or a clear error before any work."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a tensor, got {type(images).__name__}.")
    if images.ndim < 4 or images.shape[0] == 0:
        raise ValueError(
            f"no images to explain: got shape {tuple(images.shape)}, expected (B, C, H, W) or (B, C, H, W, D), B >= 1."
        )
    check_inputs(network, images)
    masks = torch.as_tensor(masks, device=images.device)
    expected = (images.shape[0], 1, *images.shape[2:])
    if masks.shape == (images.shape[0], *images.shape[2:]):
        masks = masks.unsqueeze(1)
    if masks.shape != expected:
        raise ValueError(
            f"masks of shape {tuple(masks.shape)} do not fit images of shape {tuple(images.shape)}: "
            f"expected {expected}."
        )
    if not ((masks == 0) | (masks == 1)).all():
        raise ValueError("masks must be binary (0/1).")
    masks = masks.to(images.dtype)
    if not masks.flatten(1).any(dim=1).any():
        raise ValueError("every mask is empty: localization needs at least one image with a lesion.")
    labels = class_indices(labels, images.shape[0], num_classes_of(network), name="labels", device=images.device)
    return images, masks, labels


def _cascade_layers(network: nn.Module, example: torch.Tensor) -> list[str]:
    """Layers of the randomization cascade, output end first: the classifier head, then each stage."""
    root = unwrap_network(network)
    heads = [name for name, module in root.named_modules() if isinstance(module, nn.Linear)]
    try:
        stages = stage_layers(root, example)
    except ValueError:
        stages = []
    layers = heads[-1:] + stages[::-1]
    if len(layers) < 2:
        from monai_kdx.metrics import randomizable_layers

        layers = randomizable_layers(root)
    return layers


def _random_maps(images: torch.Tensor, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((images.shape[0], 1, *images.shape[2:]), generator=generator).to(images)


def compare_explainers(
    network: nn.Module,
    images: torch.Tensor,
    masks: Any,
    labels: Any,
    methods: Sequence[str] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    tolerance: int = 1,
    faithfulness_steps: int = 20,
    insertion: bool = True,
    sanity_images: int = 2,
    randomization_layers: Sequence[str] | None = None,
    include_random: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Score every method on the same images: localization, faithfulness, sanity check and time.

    Every image is explained for its own label, one image per ``attribute`` call (so ``seconds_per_image`` is
    the latency of explaining one image). Localization is averaged over the images whose mask is not empty;
    faithfulness over all images. The randomization check runs on the first ``sanity_images`` images, through
    a cascade that re-initializes the classifier head, then each stage of the network, deepest first (a copy:
    ``network`` is never modified).

    Args:
        network: a trained 2D or 3D classifier returning (B, num_classes) logits.
        images: (B, C, H, W) or (B, C, H, W, D).
        masks: (B, 1, *spatial) or (B, *spatial) binary lesion masks (empty masks allowed, not all).
        labels: (B,) class indices (the class each image is explained for).
        methods: registered explainer names; ``None`` compares all of them.
        options: per-method constructor options, merged over :func:`default_options`.
        tolerance: pointing-game dilation of the mask in pixels/voxels.
        faithfulness_steps: perturbation steps of the deletion and insertion curves.
        insertion: also compute insertion AUC (another ``faithfulness_steps + 1`` forwards per image).
        sanity_images: images used by the randomization check (0 skips it: NaN in the rows).
        randomization_layers: module paths of the cascade; ``None`` picks the head then each stage.
        include_random: add the ``"random"`` baseline row (uniform noise maps) last.
        seed: seed of the random baseline and of the re-initialization.
        progress: show a tqdm progress bar over the methods.

    Returns:
        One dict per method (baseline last): ``method``, the keys of :data:`METRICS` (floats, NaN where not
        computed), ``options`` (the options used) and ``error`` (None, or the message of a method that failed;
        its metrics are then NaN).

    Raises:
        ValueError: an unknown method (valid ones listed), no images, masks of the wrong shape or all empty,
            labels that do not fit; all raised before any explanation is computed.
    """
    from monai_kdx.metrics import deletion_auc, insertion_auc, pointing_game, randomization_sanity_check, relevance_mass

    methods = check_methods(methods)
    images, masks, labels = _check_data(network, images, masks, labels)
    if int(faithfulness_steps) < 1 or int(sanity_images) < 0 or int(tolerance) < 0:
        raise ValueError("faithfulness_steps must be >= 1, sanity_images and tolerance >= 0.")
    merged = default_options(images.ndim - 2)
    for name, values in (options or {}).items():
        merged[name] = {**merged.get(name, {}), **values}
    lesion = masks.flatten(1).any(dim=1)
    cascade = None
    if sanity_images:
        cascade = list(randomization_layers) if randomization_layers else _cascade_layers(network, images[:1])
    names = [*methods, *([RANDOM_BASELINE] if include_random else [])]
    iterator: Any = names
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(names, desc="explainers", unit="method")

    rows = []
    for name in iterator:
        if progress:
            iterator.set_postfix_str(name)
        opts = dict(merged.get(name, {})) if name != RANDOM_BASELINE else {}
        row: dict[str, Any] = {"method": name, **dict.fromkeys(METRICS, math.nan), "options": opts, "error": None}
        try:
            if name == RANDOM_BASELINE:
                maps, seconds = _random_maps(images, seed), [0.0]
            else:
                explainer = build_explainer(name, network, **opts)
                parts, seconds = [], []
                for i in range(images.shape[0]):
                    part, elapsed = timed(lambda e=explainer, i=i: e.attribute(images[i : i + 1], labels[i : i + 1]))
                    parts.append(part.detach())
                    seconds.append(elapsed)
                maps = torch.cat(parts).to(images.dtype)
            if not torch.isfinite(maps).all():
                raise ValueError("the maps hold NaN or infinite values.")
            row["seconds_per_image"] = statistics.median(seconds)
            row["pointing_game"] = float(pointing_game(maps[lesion], masks[lesion], tolerance=tolerance).mean())
            row["relevance_mass"] = float(relevance_mass(maps[lesion], masks[lesion]).mean())
            row["deletion_auc"] = float(deletion_auc(network, images, maps, labels, steps=faithfulness_steps).mean())
            if insertion:
                auc = insertion_auc(network, images, maps, labels, steps=faithfulness_steps)
                row["insertion_auc"] = float(auc.mean())
            if cascade and name != RANDOM_BASELINE:
                count = min(int(sanity_images), images.shape[0])

                def explain_fn(
                    model: nn.Module, x: torch.Tensor, target: Any, name: str = name, opts: dict = opts
                ) -> torch.Tensor:
                    return build_explainer(name, model, **opts).attribute(x, target).detach()

                check = randomization_sanity_check(
                    network, explain_fn, images[:count], labels[:count], layers=cascade, seed=seed
                )
                row["randomization_similarity"] = float(check.similarity[check.layers[-1]].abs().mean())
        except Exception as error:  # one failing method must not lose the others' results
            row.update(dict.fromkeys(METRICS, math.nan), error=f"{type(error).__name__}: {error}")
        rows.append(row)
    return rows


@dataclass
class ExplainerComparison:
    """The rows of one :func:`compare_explainers` call and what they were computed on.

    Attributes:
        name: a title, e.g. the dataset kind.
        rows: the rows returned by :func:`compare_explainers`.
        details: free-form facts shown above the table (network, accuracy, image size, settings).
    """

    name: str
    rows: list[dict[str, Any]]
    details: dict[str, Any] = field(default_factory=dict)


def _cell(value: Any, key: str) -> str:
    if not isinstance(value, float) or math.isnan(value):
        return "—"
    if key == "seconds_per_image":
        return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"
    return f"{value:.3f}"


def _options_text(options: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"


def _highlights(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per metric naming the best method, plus the methods that fail the sanity check."""
    methods = [r for r in rows if r["method"] != RANDOM_BASELINE and r["error"] is None]
    lines = []
    for key, (title, higher) in METRICS.items():
        scored = [r for r in methods if not math.isnan(r[key])]
        if not scored:
            continue
        best = max(scored, key=lambda r: r[key] if higher else -r[key])
        lines.append(f"best {title.rstrip(' ↑↓')}: **{best['method']}** ({_cell(best[key], key)})")
    failing = [r["method"] for r in methods if r["randomization_similarity"] > 0.5]
    if failing:
        lines.append(f"maps still similar (> 0.5) once the weights are randomized: {', '.join(failing)}")
    return lines


def comparison_markdown(comparisons: Sequence[ExplainerComparison], title: str | None = None) -> str:
    """A markdown report: per comparison, its details, one table row per method and the highlights."""
    lines = [f"# {title}", ""] if title else []
    headers = ["method", *(t for t, _ in METRICS.values()), "options"]
    for comparison in comparisons:
        lines += [f"## {comparison.name}", ""]
        lines += [f"- {key}: {value}" for key, value in comparison.details.items()]
        table = []
        for row in comparison.rows:
            if row["error"] is not None:
                cells = [f"failed: {row['error']}"] + [""] * (len(METRICS) - 1)
            else:
                cells = [_cell(row[key], key) for key in METRICS]
            baseline = row["method"] == RANDOM_BASELINE
            options = "baseline: uniform noise maps" if baseline else _options_text(row["options"])
            table.append([row["method"], *cells, options])
        lines += ["", markdown_table(headers, table), ""]
        lines += [f"- {line}" for line in _highlights(comparison.rows)] + [""]
    return "\n".join(lines)


def plot_comparison(comparisons: Sequence[ExplainerComparison], path: str | os.PathLike) -> Path:
    """Grouped bars: one panel per metric, one group per method, one bar per comparison (time on a log axis);
    the random baseline is a dashed line in the comparison's colour.

    Returns:
        The path of the written PNG.
    """
    methods: list[str] = []
    for comparison in comparisons:
        methods += [r["method"] for r in comparison.rows if r["method"] not in (*methods, RANDOM_BASELINE)]
    panels, baselines = [], []
    for key, (title, _) in METRICS.items():
        series, random = {}, {}
        for comparison in comparisons:
            values = {r["method"]: r[key] for r in comparison.rows}
            series[comparison.name] = [values.get(m, math.nan) for m in methods]
            if key != "seconds_per_image":
                random[comparison.name] = values.get(RANDOM_BASELINE, math.nan)
        panels.append((title, series))
        baselines.append(random)
    log_scale = [key == "seconds_per_image" for key in METRICS]
    return bar_panels(panels, methods, path, baselines=baselines, baseline_name=RANDOM_BASELINE, log_scale=log_scale)


def write_report(
    comparisons: Sequence[ExplainerComparison],
    out_dir: str | os.PathLike,
    title: str = "Explanation methods compared",
    stem: str = "report",
) -> dict[str, Path]:
    """Write ``<stem>.md``, ``<stem>.png`` and ``<stem>.json`` (NaN as null) into ``out_dir``.

    Returns:
        ``{"markdown": …, "png": …, "json": …}`` paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {key: out / f"{stem}.{suffix}" for key, suffix in (("markdown", "md"), ("png", "png"), ("json", "json"))}
    paths["markdown"].write_text(comparison_markdown(comparisons, title) + "\n", encoding="utf-8")
    plot_comparison(comparisons, paths["png"])
    write_json(paths["json"], [{"name": c.name, "details": c.details, "rows": c.rows} for c in comparisons])
    return paths
