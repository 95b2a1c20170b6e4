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

:func:`run_comparison` is the one-call form behind ``monai-kdx compare-explanations``: generate a dataset kind,
train the bundles' teacher briefly (or load a checkpoint), compare the methods on test images with lesions.

Example:
    >>> rows = compare_explainers(network, images, masks, labels, methods=["gradcam", "occlusion"])
    >>> comparison = ExplainerComparison("chest-xray-2d", rows)
    >>> write_report([comparison], "runs/compare")  # report.md, report.png, report.json
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monai_kdx.networks import load_weights, num_classes_of, unwrap_network
from monai_kdx.registry import EXPLAINERS

from .base import build_explainer, check_inputs
from .cam import stage_layers

__all__ = [
    "METRICS",
    "RANDOM_BASELINE",
    "PRESETS",
    "ExplainerComparison",
    "check_methods",
    "compare_explainers",
    "comparison_markdown",
    "dataset_tensors",
    "default_options",
    "plot_comparison",
    "run_comparison",
    "teacher_network",
    "student_network",
    "train_classifier",
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

# Settings of run_comparison per dataset kind. The full run fits in about 10 minutes on 2 CPU cores for both
# kinds together; at these small sizes the default lesions would be 1-2 pixels wide, so they are enlarged.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "full": {
        "chest-xray-2d": {"spatial_size": 64, "n": 240, "epochs": 12, "knobs": {"lesion_size": (10.0, 20.0)}},
        "brain-mri-3d": {
            "spatial_size": 32,
            "n": 240,
            "epochs": 12,
            "knobs": {"lesion_size": (20.0, 32.0), "lesion_contrast": (0.4, 0.8)},
        },
        "retina-2d": {"spatial_size": 64, "n": 240, "epochs": 12, "knobs": {}},
        "settings": {"n_images": 24, "sanity_images": 4, "faithfulness_steps": 20, "network": "teacher"},
    },
    "quick": {
        "chest-xray-2d": {"spatial_size": 32, "n": 24, "epochs": 1, "knobs": {"lesion_size": (20.0, 30.0)}},
        "brain-mri-3d": {
            "spatial_size": 32,
            "n": 24,
            "epochs": 1,
            "knobs": {"lesion_size": (20.0, 32.0), "lesion_contrast": (0.4, 0.8)},
        },
        "retina-2d": {"spatial_size": 32, "n": 24, "epochs": 1, "knobs": {}},
        "settings": {"n_images": 2, "sanity_images": 1, "faithfulness_steps": 5, "network": "student"},
    },
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
    labels = torch.as_tensor(labels, device=images.device).reshape(-1)
    if labels.is_floating_point() or labels.numel() != images.shape[0]:
        raise ValueError(f"labels must be {images.shape[0]} integer class indices, got {tuple(labels.shape)}.")
    num_classes = num_classes_of(network)
    if ((labels < 0) | (labels >= (num_classes or math.inf))).any():
        raise ValueError(f"labels {labels.tolist()} out of range for a network with {num_classes} classes.")
    return images, masks, labels.long()


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
                    start = time.perf_counter()
                    parts.append(explainer.attribute(images[i : i + 1], labels[i : i + 1]).detach())
                    seconds.append(time.perf_counter() - start)
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
    columns = ["method", *(t for t, _ in METRICS.values()), "options"]
    for comparison in comparisons:
        lines += [f"## {comparison.name}", ""]
        lines += [f"- {key}: {value}" for key, value in comparison.details.items()]
        lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for row in comparison.rows:
            if row["error"] is not None:
                cells = [f"failed: {row['error']}".replace("|", "/")] + [""] * (len(METRICS) - 1)
            else:
                cells = [_cell(row[key], key) for key in METRICS]
            baseline = row["method"] == RANDOM_BASELINE
            options = "baseline: uniform noise maps" if baseline else _options_text(row["options"])
            lines.append("| " + " | ".join([row["method"], *cells, options]) + " |")
        lines += [""] + [f"- {line}" for line in _highlights(comparison.rows)] + [""]
    return "\n".join(lines)


def plot_comparison(comparisons: Sequence[ExplainerComparison], path: str | os.PathLike) -> Path:
    """Grouped bars: one panel per metric, one group per method, one bar per comparison (time on a log axis);
    the random baseline is a dashed line in the comparison's colour.

    Returns:
        The path of the written PNG.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    methods: list[str] = []
    for comparison in comparisons:
        methods += [r["method"] for r in comparison.rows if r["method"] not in (*methods, RANDOM_BASELINE)]
    keys = list(METRICS)
    columns = 3
    fig, axes = plt.subplots(math.ceil(len(keys) / columns), columns, figsize=(6 * columns, 4.2 * 2), squeeze=False)
    width = 0.8 / max(1, len(comparisons))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes.flat, keys, strict=False):
        for k, comparison in enumerate(comparisons):
            color = colors[k % len(colors)]
            values = {r["method"]: r[key] for r in comparison.rows}
            heights = [values.get(m, math.nan) for m in methods]
            positions = [i + (k - (len(comparisons) - 1) / 2) * width for i in range(len(methods))]
            ax.bar(positions, heights, width=width, label=comparison.name, color=color)
            baseline = values.get(RANDOM_BASELINE, math.nan)
            if key != "seconds_per_image" and math.isfinite(baseline):
                ax.axhline(baseline, color=color, linestyle="--", linewidth=1, label=f"{comparison.name}: random")
        ax.set_title(METRICS[key][0])
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=45, ha="right", fontsize=8)
        if key == "seconds_per_image":
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    return value


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
    payload = [{"name": c.name, "details": c.details, "rows": c.rows} for c in comparisons]
    paths["json"].write_text(json.dumps(_jsonable(payload), indent=2), encoding="utf-8")
    return paths


def teacher_network(kind: str, spatial_dims: int | None = None) -> nn.Module:
    """The bundles' teacher for a dataset kind: MONAI ``DenseNet121(init_features=16, growth_rate=8)`` with one
    input channel and one output per class (checkpoints of ``train_teacher.yaml`` load into it)."""
    from monai.networks.nets import DenseNet121

    from monai_kdx.data import class_names
    from monai_kdx.data.synthetic import get_generator

    dims = spatial_dims or get_generator(kind).spatial_dims
    return DenseNet121(
        spatial_dims=dims, in_channels=1, out_channels=len(class_names(kind)), init_features=16, growth_rate=8
    )


def student_network(kind: str) -> nn.Module:
    """A small :class:`~monai_kdx.networks.ShallowCNN` (three blocks of 8, 16, 16 channels) for a dataset kind: the
    network of the quick comparison, where speed matters more than accuracy."""
    from monai_kdx.data import class_names
    from monai_kdx.data.synthetic import get_generator
    from monai_kdx.networks import ShallowCNN

    dims = get_generator(kind).spatial_dims
    return ShallowCNN(dims, 1, len(class_names(kind)), channels=(8, 16, 16), hidden=16, dropout=0.0)


def dataset_tensors(kind: str, n: int, seed: int = 0, **knobs: Any) -> dict[str, Any]:
    """Generate ``n`` samples of ``kind`` as tensors, each image normalized to zero mean and unit variance
    (as the bundles' ``NormalizeIntensityd``).

    Returns:
        ``images`` (n, 1, *spatial), ``masks`` (n, 1, *spatial), ``labels`` (n,), ``splits`` (n names).
    """
    from monai_kdx.data import generate_dataset

    samples = generate_dataset(kind, n=n, seed=seed, **knobs)
    images = torch.stack([torch.as_tensor(s.image, dtype=torch.float32)[None] for s in samples])
    dims = tuple(range(1, images.ndim))
    images = (images - images.mean(dim=dims, keepdim=True)) / images.std(dim=dims, keepdim=True).clamp_min(1e-8)
    masks = torch.stack([torch.as_tensor(s.mask)[None] for s in samples]).float()
    labels = torch.tensor([int(s.label) for s in samples])
    return {"images": images, "masks": masks, "labels": labels, "splits": [s.split for s in samples]}


def train_classifier(
    network: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int,
    batch_size: int = 8,
    learning_rate: float = 1e-3,
    seed: int = 0,
) -> nn.Module:
    """Train ``network`` in place with Adam and cross-entropy (random flips along the first spatial axis),
    under ``seed`` in a forked RNG; returns it in eval mode."""
    optimizer = torch.optim.Adam(network.parameters(), lr=learning_rate)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network.train()
        for _ in range(int(epochs)):
            order = torch.randperm(images.shape[0])
            for start in range(0, len(order), batch_size):
                index = order[start : start + batch_size]
                if len(index) < 2:  # BatchNorm needs two samples
                    continue
                x = images[index]
                flip = torch.rand(len(index)) < 0.5
                x = torch.where(flip.view(-1, *[1] * (x.ndim - 1)), x.flip(2), x)
                optimizer.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(network(x), labels[index]).backward()
                optimizer.step()
    return network.eval()


def _accuracy(network: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        predictions = torch.cat([network(images[i : i + 16]).argmax(1) for i in range(0, len(images), 16)])
    return float((predictions == labels).float().mean())


def run_comparison(
    kind: str,
    quick: bool = False,
    checkpoint: str | os.PathLike | None = None,
    methods: Sequence[str] | None = None,
    n_images: int | None = None,
    spatial_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> ExplainerComparison:
    """Generate data of ``kind``, train the bundles' teacher briefly (or load ``checkpoint``), and compare the
    methods on test images with lesions, each explained for its true class.

    Args:
        kind: a dataset kind (``chest-xray-2d``, ``brain-mri-3d``, ``retina-2d``).
        quick: the tiny preset (a small student network, seconds, for tests) instead of the full one (see
            :data:`PRESETS`).
        checkpoint: a ``train_teacher.yaml`` checkpoint to explain instead of training (the dataset's default
            lesion settings are then used, so the images match what it was trained on).
        methods: registered explainer names (``None``: all).
        n_images: test images to explain (default from the preset).
        spatial_size: image side length (default from the preset).
        seed: dataset, training and randomization seed.
        progress: progress bar over the methods.

    Raises:
        ValueError: an unknown kind or method, or no test image with a lesion; before any training.
        FileNotFoundError: ``checkpoint`` does not exist.
    """
    from monai_kdx.data.synthetic import get_generator

    generator = get_generator(kind)  # ValueError naming the valid kinds
    preset_name = "quick" if quick else "full"
    preset, settings = PRESETS[preset_name].get(kind), PRESETS[preset_name]["settings"]
    preset = preset or {"spatial_size": 64 if generator.spatial_dims == 2 else 32, "n": 120, "epochs": 12, "knobs": {}}
    methods = check_methods(methods)
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"no checkpoint at {os.fspath(checkpoint)!r}.")
    size = spatial_size or preset["spatial_size"]
    count = n_images or settings["n_images"]
    knobs = {} if checkpoint is not None else dict(preset["knobs"])
    data = dataset_tensors(kind, preset["n"], seed=seed, spatial_size=size, **knobs)
    test = torch.tensor([s == "test" for s in data["splits"]])
    with_lesion = torch.nonzero(test & data["masks"].flatten(1).any(dim=1)).flatten()[:count]
    if len(with_lesion) == 0:
        raise ValueError(f"no test image with a lesion among {preset['n']} samples of {kind!r}.")
    use_teacher = checkpoint is not None or settings["network"] == "teacher"
    with torch.random.fork_rng(devices=[]):  # the same seed gives the same initial weights
        torch.manual_seed(seed)
        network = teacher_network(kind) if use_teacher else student_network(kind)
    start = time.perf_counter()
    if checkpoint is not None:
        load_weights(network, os.fspath(checkpoint)).eval()
        source = f"checkpoint {os.fspath(checkpoint)}"
    else:
        train_classifier(network, data["images"][~test], data["labels"][~test], preset["epochs"], seed=seed)
        source = f"trained here: {preset['epochs']} epochs on {int((~test).sum())} images (Adam, lr 1e-3, batch 8)"
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    rows = compare_explainers(
        network,
        data["images"][with_lesion],
        data["masks"][with_lesion],
        data["labels"][with_lesion],
        methods,
        default_options(generator.spatial_dims, quick),
        faithfulness_steps=settings["faithfulness_steps"],
        sanity_images=settings["sanity_images"],
        seed=seed,
        progress=progress,
    )
    shape = "×".join([str(size)] * generator.spatial_dims)
    details = {
        "network": "MONAI DenseNet121(init_features=16, growth_rate=8), the bundles' teacher"
        if use_teacher
        else "ShallowCNN(channels=(8, 16, 16)), a small student (quick mode)",
        "threads": torch.get_num_threads(),
        "weights": source,
        "test accuracy": f"{_accuracy(network, data['images'][test], data['labels'][test]):.3f} "
        f"on {int(test.sum())} test images",
        "images explained": f"{len(with_lesion)} test images with a lesion, {shape}, each for its true class",
        "dataset": f"{kind}, n={preset['n']}, seed={seed}" + (f", {knobs}" if knobs else ""),
        "metrics": "pointing game with tolerance 1 pixel/voxel; "
        f"deletion/insertion with {settings['faithfulness_steps']} "
        "steps to a 0 baseline (the image mean); randomization: absolute Spearman similarity after "
        f"re-initializing the head and every stage, on {min(settings['sanity_images'], len(with_lesion))} image(s); "
        "s / image: median of one-image calls",
        "seconds": f"training {train_seconds:.1f}, comparison {time.perf_counter() - start:.1f}",
    }
    return ExplainerComparison(kind, rows, details)
