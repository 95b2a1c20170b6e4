"""The application behind ``monai-kdx compare-explanations``: generate a dataset kind, train the bundles' teacher
briefly (or load a checkpoint), and compare every explanation method on test images with lesions with the
comparison library :mod:`monai_kdx.explain.comparison`.

The dataset kind is resolved once, by :func:`run_comparison`, which reads from it what the networks need (spatial
dimensionality, number of classes); the networks are built from plain specs through
:func:`monai_kdx.networks.build_network`.

Example:
    >>> comparison = run_comparison("chest-xray-2d", quick=True, methods=["gradcam", "occlusion"])
    >>> write_report([comparison], "runs/compare")  # report.md, report.png, report.json
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from monai_kdx.data import generate_dataset
from monai_kdx.data.synthetic import get_generator
from monai_kdx.explain.comparison import ExplainerComparison, check_methods, compare_explainers, default_options
from monai_kdx.networks import build_network, load_weights

__all__ = ["PRESETS", "dataset_tensors", "network_spec_for", "train_classifier", "accuracy", "run_comparison"]

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

_NETWORKS = {
    "teacher": (
        {"network": "DenseNet121", "init_features": 16, "growth_rate": 8},
        "MONAI DenseNet121(init_features=16, growth_rate=8), the bundles' teacher",
    ),
    "student": (
        {"network": "ShallowCNN", "channels": [8, 16, 16], "hidden": 16, "dropout": 0.0},
        "ShallowCNN(channels=(8, 16, 16)), a small student (quick mode)",
    ),
}


def network_spec_for(role: str, spatial_dims: int, num_classes: int) -> dict[str, Any]:
    """The plain network spec of a comparison network: ``"teacher"`` (the bundles' DenseNet121 teacher, whose
    ``train_teacher.yaml`` checkpoints load into it) or ``"student"`` (a small ShallowCNN for the quick mode)."""
    base, _ = _NETWORKS[role]
    return {**base, "spatial_dims": spatial_dims, "in_channels": 1, "out_channels": num_classes}


def dataset_tensors(kind: str, n: int, seed: int = 0, **knobs: Any) -> dict[str, Any]:
    """Generate ``n`` samples of ``kind`` as tensors, each image normalized to zero mean and unit variance
    (as the bundles' ``NormalizeIntensityd``).

    Returns:
        ``images`` (n, 1, *spatial), ``masks`` (n, 1, *spatial), ``labels`` (n,), ``splits`` (n names).

    Raises:
        ValueError: an unknown kind (the valid kinds are listed).
    """
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


def accuracy(network: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of ``images`` (N, C, *spatial) classified as ``labels`` (N,), batches of 16, without gradients."""
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
    preset_name = "quick" if quick else "full"
    settings = PRESETS[preset_name]["settings"]
    methods = check_methods(methods)
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"no checkpoint at {os.fspath(checkpoint)!r}.")
    generator = get_generator(kind)  # the kind, resolved once; ValueError naming the valid kinds, before any work
    dims, num_classes = generator.spatial_dims, len(generator.class_names)
    default = {"spatial_size": 64 if dims == 2 else 32, "n": 120, "epochs": 12, "knobs": {}}
    preset = PRESETS[preset_name].get(kind) or default
    size = spatial_size or preset["spatial_size"]
    count = n_images or settings["n_images"]
    knobs = {} if checkpoint is not None else dict(preset["knobs"])
    data = dataset_tensors(kind, preset["n"], seed=seed, spatial_size=size, **knobs)
    test = torch.tensor([s == "test" for s in data["splits"]])
    with_lesion = torch.nonzero(test & data["masks"].flatten(1).any(dim=1)).flatten()[:count]
    if len(with_lesion) == 0:
        raise ValueError(f"no test image with a lesion among {preset['n']} samples of {kind!r}.")
    role = "teacher" if checkpoint is not None or settings["network"] == "teacher" else "student"
    with torch.random.fork_rng(devices=[]):  # the same seed gives the same initial weights
        torch.manual_seed(seed)
        network = build_network(network_spec_for(role, dims, num_classes))
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
        default_options(dims, quick),
        faithfulness_steps=settings["faithfulness_steps"],
        sanity_images=settings["sanity_images"],
        seed=seed,
        progress=progress,
    )
    shape = "×".join([str(size)] * dims)
    details = {
        "network": _NETWORKS[role][1],
        "threads": torch.get_num_threads(),
        "weights": source,
        "test accuracy": f"{accuracy(network, data['images'][test], data['labels'][test]):.3f} "
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
