"""Tutorial 5: hierarchical explanations, pixel attribution and concepts, scored against the lesion masks.

Run it with ``.venv/bin/python tutorials/05_hierarchical_explanations.py [--quick] [--out DIR]``.

1. Write the 3D brain MRI dataset (NIfTI + MONAI datalist), read it with MONAI dictionary transforms and train
   a :class:`~monai_kdx.networks.ShallowCNN` briefly with MONAI's ``SupervisedTrainer``.
2. Explain every test volume with a lesion, for its true class:

   * :class:`~monai_kdx.explain.HierarchicalCAM`: Grad-CAM++ maps of four depths (``blocks.0`` … ``blocks.3``)
     from ONE forward and ONE backward pass, upsampled to the input, plus their fusion;
   * pixel attribution through the one ``attribute`` verb of the registered explainers
     (``build_explainer(name, network, **options).attribute(x, target)``): ``integrated_gradients``
     (captum), ``occlusion`` (coarse grid) and ``lrp`` (zennit);
   * a concept-based explanation: lesion-texture patches cut from the training masks
     (:func:`~monai_kdx.explain.concept_patches`) define a concept; :class:`~monai_kdx.explain.TCAV` tests
     whether each class's logit grows along its concept activation vector (CAV), and the CAV projected onto the
     activations of ``blocks.1`` at every voxel gives a concept map.

3. Score every map with the metrics of :mod:`monai_kdx.metrics`: localization against the lesion mask
   (``pointing_game``, ``relevance_mass``) and faithfulness to the model (``deletion_auc``: lower is better,
   ``insertion_auc``: higher is better). ``DIR/explanations_3d.png`` shows the maps of one volume side by side,
   ``DIR/explanation_scores.png`` the scores.
4. 2D, in short: the same explainers on a chest radiograph held in memory, drawn with
   :func:`~monai_kdx.visualize.explanation_figure`: ``DIR/explanations_2d.png``.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from monai.data import CacheDataset, DataLoader, Dataset
from monai.engines import SupervisedTrainer
from monai.transforms import Compose, EnsureTyped, LoadImaged, NormalizeIntensityd, RandFlipd, SelectItemsd
from monai.utils import set_determinism

from monai_kdx.data import class_names, generate_dataset, load_datalist, write_dataset
from monai_kdx.explain import TCAV, HierarchicalCAM, build_explainer, concept_patches, fit_cav, minmax_normalize
from monai_kdx.metrics import deletion_auc, insertion_auc, pointing_game, relevance_mass
from monai_kdx.networks import FeatureCapture, ShallowCNN
from monai_kdx.registry import EXPLAINERS
from monai_kdx.visualize import draw_overlay, explanation_figure, focus_point, planes

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KNOBS_3D = {"lesion_size": (20.0, 32.0), "lesion_contrast": (0.4, 0.8)}  # visible at 32³
LEVELS = ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]  # 1/2 … 1/16 of the input size
CONCEPT_LAYER = "blocks.1"
CHANNELS = (8, 16, 32, 64)  # ShallowCNN's conv blocks


def load(datalist: Path, split: str) -> CacheDataset:
    keys = ["image", "mask"]
    transform = Compose([
        LoadImaged(keys=keys, ensure_channel_first=True),
        NormalizeIntensityd(keys="image"),
        EnsureTyped(keys=keys, dtype=torch.float32),
        SelectItemsd(keys=[*keys, "label"]),
    ])  # fmt: skip
    return CacheDataset(load_datalist(datalist, split), transform, progress=False)


def train(network: torch.nn.Module, dataset, epochs: int) -> None:
    flip = RandFlipd(keys=["image", "mask"], prob=0.5, spatial_axis=0, allow_missing_keys=True)
    trainer = SupervisedTrainer(
        device=DEVICE,
        max_epochs=epochs,
        train_data_loader=DataLoader(Dataset(dataset, flip), batch_size=4, shuffle=True),
        network=network,
        optimizer=torch.optim.Adam(network.parameters(), lr=1e-3),
        loss_function=torch.nn.CrossEntropyLoss(),
    )
    trainer.run()
    network.eval()


def stack(dataset, key: str) -> torch.Tensor:
    return torch.stack([torch.as_tensor(item[key]) for item in dataset]).to(DEVICE)


def concept_map(network, cav: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """The CAV projected onto the concept layer's activation at every position, positive part, resized to the
    input and min-max normalized: where the network sees the concept. (B, 1, *spatial)."""
    with torch.no_grad(), FeatureCapture(network, [CONCEPT_LAYER]) as features:
        network(images)
    projection = torch.einsum("bc...,c->b...", features[CONCEPT_LAYER], cav.to(images.device))[:, None].clamp_min(0)
    mode = "bilinear" if images.ndim == 4 else "trilinear"
    return minmax_normalize(F.interpolate(projection, size=images.shape[2:], mode=mode))


def scores(network, images, masks, labels, maps: dict[str, torch.Tensor], steps: int) -> dict[str, dict[str, float]]:
    """Localization and faithfulness of every map, averaged over the images."""
    table = {}
    for name, attribution in maps.items():
        table[name] = {
            "pointing game ↑": pointing_game(attribution, masks, tolerance=1).mean().item(),
            "relevance mass ↑": relevance_mass(attribution, masks).mean().item(),
            "deletion AUC ↓": deletion_auc(network, images, attribution, labels, steps=steps).mean().item(),
            "insertion AUC ↑": insertion_auc(network, images, attribution, labels, steps=steps).mean().item(),
        }
    return table


def explain_all(network, images, labels, spatial_dims: int, quick: bool) -> dict[str, torch.Tensor]:
    """Hierarchical Grad-CAM++ (every level and the fusion) and three registered pixel-attribution methods."""
    result = HierarchicalCAM(network, layers=LEVELS, mode="gradcam++").cam(images, class_idx=labels)
    maps = {f"Grad-CAM++ {level}": cam for level, cam in result.items()}
    maps["Grad-CAM++ fused"] = result.fused
    options = {
        "integrated_gradients": {"n_steps": 8 if quick else 16, "internal_batch_size": 16},
        "occlusion": {"grid": 4 if spatial_dims == 3 else 8, "batch_size": 64},
        "lrp": {},
    }
    for name, kwargs in options.items():
        maps[name] = build_explainer(name, network, **kwargs).attribute(images, target=labels)
    return maps


def figure_3d(image, mask, maps: dict[str, np.ndarray], path: Path) -> None:
    point = focus_point(mask.shape, mask)
    panels = [("image + lesion", None), *maps.items()]
    columns = (len(panels) + 1) // 2
    fig, axes = plt.subplots(2, columns, figsize=(2.4 * columns, 5.6), squeeze=False)
    for ax, (name, heatmap) in zip(axes.flat, panels, strict=False):
        heat = None if heatmap is None else planes(heatmap, point)[0]
        draw_overlay(ax, planes(image, point)[0], planes(mask, point)[0], heat, title=name)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle("one test volume, axial slice through the lesion (red), each map for the true class (positive part)",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def score_figure(table: dict[str, dict[str, float]], path: Path) -> None:
    metrics = list(next(iter(table.values())))
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.3 * len(metrics), 3.6))
    names = list(table)
    for ax, metric in zip(axes, metrics, strict=True):
        ax.barh(range(len(names)), [table[n][metric] for n in names], color="tab:blue")
        ax.set_yticks(range(len(names)), names if ax is axes[0] else [""] * len(names), fontsize=7)
        ax.invert_yaxis()
        ax.set_title(metric, fontsize=9)
        ax.set_xlim(0, 1)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def part_3d(out: Path, quick: bool) -> None:
    n, epochs, steps = (64, 3, 8) if quick else (160, 12, 20)
    names = class_names("brain-mri-3d")
    datalist = write_dataset(out / "brain", kind="brain-mri-3d", n=n, seed=0, spatial_size=32, progress=False,
                             **KNOBS_3D)  # fmt: skip
    training, test = load(datalist, "training"), load(datalist, "test")
    # four conv blocks: inputs down to 16³ pass through, so the 16³ concept patches below do too
    network = ShallowCNN(spatial_dims=3, in_channels=1, out_channels=len(names), channels=CHANNELS).to(DEVICE)
    train(network, training, epochs)
    lesion = [item for item in test if item["mask"].any()][:12]  # at most 12: faithfulness costs 2 x steps passes
    images, masks = stack(lesion, "image"), stack(lesion, "mask")
    labels = torch.tensor([int(item["label"]) for item in lesion], device=DEVICE)
    with torch.no_grad():
        accuracy = (network(stack(test, "image")).argmax(1).cpu() == torch.tensor([int(t["label"]) for t in test]))
    print(f"3D: ShallowCNN trained {epochs} epochs on {len(training)} volumes of 32³, test accuracy "
          f"{accuracy.float().mean():.3f}; explaining {len(lesion)} test volumes with a lesion")
    print(f"registered explainers: {', '.join(EXPLAINERS.names())}")

    maps = explain_all(network, images, labels, 3, quick)

    # concepts: lesion-texture patches vs random patches away from the lesions, from the training volumes
    concept, random = concept_patches(stack(training, "image"), stack(training, "mask"), patch_size=16, n_per_image=2)
    concept = concept[: len(random) // 2]  # each TCAV run draws two disjoint random sets as large as the concept
    tcav = TCAV(network, ["blocks.0", CONCEPT_LAYER, "blocks.2"])
    training_labels = torch.tensor([int(item["label"]) for item in training], device=DEVICE)
    for label in range(1, len(names)):  # the lesion classes
        inputs = stack(training, "image")[training_labels == label]
        results = tcav.run(concept, random, inputs, target=label, runs=5 if quick else 10)
        print(f"  TCAV 'lesion texture' for {names[label]!r} ({len(inputs)} training volumes): " + ", ".join(
            f"{layer} {r.score:.2f} (p={r.p_value:.2f}{', significant' if r.significant else ''})"
            for layer, r in results.items()))  # fmt: skip
    activations = tcav.activations(torch.cat([concept, random]))[CONCEPT_LAYER]
    cav = fit_cav(activations[: len(concept)], activations[len(concept) :])
    maps[f"concept map {CONCEPT_LAYER}"] = concept_map(network, cav, images)

    table = scores(network, images, masks, labels, maps, steps)
    metrics = list(next(iter(table.values())))
    print(f"  {'method':26s}" + "".join(f"{m:>18s}" for m in metrics))
    for name, row in table.items():
        print(f"  {name:26s}" + "".join(f"{row[m]:18.3f}" for m in metrics))
    best = max(table, key=lambda name: table[name]["relevance mass ↑"])
    print(f"highest relevance mass on the lesions: {best} ({table[best]['relevance mass ↑']:.3f})")

    # drawn: the positive part (what speaks for the class); the metrics above used the signed maps
    shown = {name.replace("Grad-CAM++ ", ""): m[0, 0].clamp_min(0).cpu().numpy() for name, m in maps.items()}
    figure_3d(images[0, 0].cpu().numpy(), masks[0, 0].cpu().numpy(), shown, out / "explanations_3d.png")
    score_figure(table, out / "explanation_scores.png")


def part_2d(out: Path, quick: bool) -> None:
    n, epochs = (48, 2) if quick else (160, 8)
    samples = generate_dataset("chest-xray-2d", n=n, seed=0, spatial_size=64, lesion_size=(10.0, 20.0))
    names = class_names("chest-xray-2d")

    def tensors(chosen):
        images = torch.stack([torch.as_tensor(s.image)[None] for s in chosen])
        images = (images - images.mean(dim=(1, 2, 3), keepdim=True)) / images.std(dim=(1, 2, 3), keepdim=True)
        return images.to(DEVICE), torch.tensor([s.label for s in chosen], device=DEVICE)

    images, labels = tensors([s for s in samples if s.split == "training"])
    network = ShallowCNN(spatial_dims=2, in_channels=1, out_channels=len(names), channels=CHANNELS).to(DEVICE)
    items = [{"image": image, "label": label} for image, label in zip(images, labels, strict=True)]
    train(network, items, epochs)  # plain (image, label) dicts work with the same MONAI trainer
    sample = next(s for s in samples if s.split == "test" and s.mask.any())
    image, label = tensors([sample])
    maps = explain_all(network, image, label, 2, quick)
    mask = torch.as_tensor(sample.mask, device=DEVICE)[None, None].float()
    hits = {name: int(pointing_game(m, mask, tolerance=1).item()) for name, m in maps.items()}
    print(f"2D: one {names[sample.label]!r} radiograph of 64², pointing game hits: "
          + ", ".join(f"{name} {hit}" for name, hit in hits.items()))  # fmt: skip
    explanation_figure(image[0, 0].cpu().numpy(), {k.replace("Grad-CAM++ ", ""): v[0, 0].clamp_min(0).cpu().numpy()
                                                   for k, v in maps.items()},
                       out / "explanations_2d.png", mask=sample.mask)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few samples and epochs")
    parser.add_argument("--out", default="runs/tutorial_05")
    args = parser.parse_args()
    if args.quick:
        torch.set_num_threads(1)
    set_determinism(seed=0)
    # the TCAV t-test on runs whose scores are all equal (few inputs) makes scipy warn about precision
    warnings.filterwarnings("ignore", message="Precision loss occurred", category=RuntimeWarning)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    part_3d(out, args.quick)
    part_2d(out, args.quick)
    print(f"figures in {out}")


if __name__ == "__main__":
    main()
