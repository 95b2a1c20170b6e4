"""Tutorial 2: knowledge distillation of a DenseNet121 teacher into a compact ShallowCNN student.

Run it with ``.venv/bin/python tutorials/02_knowledge_distillation.py [--quick] [--out DIR]``.

1. Write the 3D brain MRI dataset to disk (NIfTI + MONAI datalist) and read it back with MONAI dictionary
   transforms. The lesions are enlarged (``lesion_size``, ``lesion_contrast``) so that a few epochs at 32³
   learn something.
2. Train the teacher, MONAI ``DenseNet121`` (16 initial features, growth rate 8), with MONAI's
   ``SupervisedTrainer``.
3. Distil it into :class:`~monai_kdx.networks.ShallowCNN` with :class:`~monai_kdx.engines.DistillationTrainer`
   (a ``SupervisedTrainer`` plus ``teacher_network``) and a :class:`~monai_kdx.losses.DistillationLoss` made of
   Hinton's :class:`~monai_kdx.losses.KnowledgeDistillationLoss` (parts ``task`` and ``kd``) and
   :class:`~monai_kdx.losses.AttentionTransferLoss` between three pairs of layers at the same resolution
   (student ``blocks.1``/``.2``/``.3``, teacher ``features.denseblock1``/``2``/``3``: 1/4, 1/8, 1/16 of the input),
   weighted down to 0.1. Each (weighted) part of the loss is in ``engine.state.output`` after every iteration; a
   small handler averages them per epoch.
4. Compare teacher and student: parameters and MACs (``count_parameters``, ``count_macs``), test accuracy
   (MONAI ``SupervisedEvaluator``), and their hierarchical Grad-CAMs (:class:`~monai_kdx.explain.HierarchicalCAM`)
   at three paired depths: the agreement of the maps (``explanation_agreement``), the pointing game on the
   lesion masks, the time per explanation, and ``DIR/teacher_vs_student_cams.png`` for one test volume.
5. 2D, in short: the same on chest radiographs held in memory (``generate_dataset``), with the KD term passed
   alone as the loss: ``DIR/distillation_losses.png`` shows the parts of both runs per epoch.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from ignite.engine import Events
from ignite.metrics import Accuracy
from matplotlib.ticker import MaxNLocator
from monai.data import CacheDataset, DataLoader, Dataset
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.networks.nets import DenseNet121
from monai.transforms import Compose, EnsureTyped, LoadImaged, NormalizeIntensityd, RandFlipd, SelectItemsd
from monai.utils import set_determinism

from monai_kdx.data import class_names, generate_dataset, load_datalist, write_dataset
from monai_kdx.engines import DistillationTrainer
from monai_kdx.explain import HierarchicalCAM
from monai_kdx.handlers import scalars, stacked
from monai_kdx.losses import AttentionTransferLoss, DistillationLoss, KnowledgeDistillationLoss
from monai_kdx.metrics import explanation_agreement, pointing_game
from monai_kdx.networks import ShallowCNN, count_macs, count_parameters
from monai_kdx.visualize import draw_overlay, focus_point, planes

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KNOBS_3D = {"lesion_size": (20.0, 32.0), "lesion_contrast": (0.4, 0.8)}  # visible at 32³
TEACHER_LEVELS = ["features.denseblock1", "features.denseblock2", "features.denseblock3"]  # 1/4, 1/8, 1/16
STUDENT_LEVELS = ["blocks.1", "blocks.2", "blocks.3"]  # the same resolutions in the student


def loaders(datalist: Path, batch_size: int) -> dict[str, DataLoader]:
    """MONAI dictionary transforms over the datalist: image, lesion mask and label of every split."""
    keys = ["image", "mask"]
    load = [
        LoadImaged(keys=keys, ensure_channel_first=True),
        NormalizeIntensityd(keys="image"),
        EnsureTyped(keys=keys, dtype=torch.float32),
        SelectItemsd(keys=[*keys, "label"]),
    ]
    flip = RandFlipd(keys=keys, prob=0.5, spatial_axis=0)  # left-right: the anatomy is symmetric enough
    result = {}
    for split in ("training", "test"):
        transform = Compose(load + [flip] if split == "training" else load)
        dataset = CacheDataset(load_datalist(datalist, split), transform, progress=False)
        result[split] = DataLoader(dataset, batch_size=batch_size, shuffle=split == "training")
    return result


def accuracy(network: torch.nn.Module, loader: DataLoader) -> float:
    """Accuracy on a loader through MONAI's ``SupervisedEvaluator`` (the network is put in eval mode)."""
    metric = Accuracy(output_transform=stacked(["pred", "label"]))
    evaluator = SupervisedEvaluator(DEVICE, loader, network, key_val_metric={"accuracy": metric})
    evaluator.run()
    return float(evaluator.state.metrics["accuracy"])


def record_parts(trainer: SupervisedTrainer, keys: list[str]) -> dict[str, list[float]]:
    """Mean of each ``engine.state.output`` scalar per epoch (the distillation parts land there)."""
    per_epoch: dict[str, list[float]] = defaultdict(list)
    running: dict[str, list[float]] = defaultdict(list)

    @trainer.on(Events.ITERATION_COMPLETED)
    def _collect(engine):
        for key, value in scalars(keys)(engine.state.output).items():
            running[key].append(value)

    @trainer.on(Events.EPOCH_COMPLETED)
    def _average(engine):
        for key in keys:
            per_epoch[key].append(float(np.mean(running.pop(key))))

    return per_epoch


def train_teacher(teacher: torch.nn.Module, loader: DataLoader, epochs: int) -> None:
    trainer = SupervisedTrainer(
        device=DEVICE,
        max_epochs=epochs,
        train_data_loader=loader,
        network=teacher,
        optimizer=torch.optim.Adam(teacher.parameters(), lr=1e-3),
        loss_function=torch.nn.CrossEntropyLoss(),
    )
    trainer.run()


def distil(student, teacher, loss: DistillationLoss | KnowledgeDistillationLoss, loader, epochs: int, keys):
    """Train ``student`` from the frozen ``teacher``; returns the per-epoch mean of each loss part."""
    trainer = DistillationTrainer(
        device=DEVICE,
        max_epochs=epochs,
        train_data_loader=loader,
        network=student,
        teacher_network=teacher,
        loss_function=loss,
        optimizer=torch.optim.Adam([*student.parameters(), *loss.parameters()], lr=1e-3),
    )
    parts = record_parts(trainer, keys)
    trainer.run()
    return parts


def explain(network, levels, images, labels):
    """Hierarchical Grad-CAM of each image for its true class, and the mean seconds per image."""
    cam = HierarchicalCAM(network, layers=levels, mode="gradcam")
    start = time.perf_counter()
    results = [cam.cam(image[None], class_idx=int(label)) for image, label in zip(images, labels, strict=True)]
    seconds = (time.perf_counter() - start) / len(images)
    maps = {level: torch.cat([r[level] for r in results]) for level in levels}
    return maps, torch.cat([r.fused for r in results]), seconds


def cam_figure(image, mask, maps: dict[str, dict[str, np.ndarray]], path: Path, title: str) -> None:
    """One row per network: the image with the lesion outline, then each level and the fused map (axial slice
    through the lesion)."""
    point = focus_point(mask.shape, mask)
    columns = 1 + max(len(m) for m in maps.values())
    fig, axes = plt.subplots(len(maps), columns, figsize=(2.3 * columns, 2.7 * len(maps)), squeeze=False)
    for row, (name, levels) in zip(axes, maps.items(), strict=True):
        draw_overlay(row[0], planes(image, point)[0], planes(mask, point)[0], title=f"{name}: image + lesion")
        for ax, (level, heatmap) in zip(row[1:], levels.items(), strict=True):
            draw_overlay(ax, planes(image, point)[0], planes(mask, point)[0], planes(heatmap, point)[0], title=level)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def part_3d(out: Path, quick: bool) -> dict[str, dict[str, list[float]]]:
    n, epochs, batch = (48, 3, 8) if quick else (160, 12, 8)
    classes = len(class_names("brain-mri-3d"))
    datalist = write_dataset(out / "brain", kind="brain-mri-3d", n=n, seed=0, spatial_size=32, progress=False,
                             **KNOBS_3D)  # fmt: skip
    data = loaders(datalist, batch)
    print(f"3D: {len(data['training'].dataset)} training / {len(data['test'].dataset)} test volumes of 32³")

    teacher = DenseNet121(spatial_dims=3, in_channels=1, out_channels=classes, init_features=16, growth_rate=8)
    student = ShallowCNN(spatial_dims=3, in_channels=1, out_channels=classes)
    teacher, student = teacher.to(DEVICE), student.to(DEVICE)
    train_teacher(teacher, data["training"], epochs)

    loss = DistillationLoss(
        {
            "logits": KnowledgeDistillationLoss(temperature=4.0, alpha=0.7),
            "attention": AttentionTransferLoss(STUDENT_LEVELS, TEACHER_LEVELS, beta=1.0),
        },
    )
    parts = distil(student, teacher, loss, data["training"], epochs, ["task", "kd", "attention", "loss"])
    for epoch in range(epochs):
        print(f"  distillation epoch {epoch + 1}: " + ", ".join(f"{k} {v[epoch]:.3f}" for k, v in parts.items()))

    shape = (1, 32, 32, 32)
    networks = {"teacher": teacher, "student": student}
    size = {name: (count_parameters(net), count_macs(net, shape)) for name, net in networks.items()}
    print(f"parameters: teacher {size['teacher'][0]:,}, student {size['student'][0]:,} "
          f"({size['student'][0] / size['teacher'][0]:.2f}x)")
    print(f"MACs per 32³ volume: teacher {size['teacher'][1]:,}, student {size['student'][1]:,} "
          f"({size['student'][1] / size['teacher'][1]:.2f}x)")
    accuracies = {name: accuracy(net, data["test"]) for name, net in networks.items()}
    print(f"test accuracy: teacher {accuracies['teacher']:.3f}, student {accuracies['student']:.3f} "
          f"(chance {1 / classes:.2f}; {len(data['test'].dataset)} volumes)")

    # hierarchical explanations of the test volumes with a lesion, each for its true class
    test = [item for item in data["test"].dataset if item["mask"].any()]
    images = torch.stack([item["image"].as_tensor() for item in test]).to(DEVICE)
    masks = torch.stack([item["mask"].as_tensor() for item in test]).to(DEVICE)
    labels = [int(item["label"]) for item in test]
    teacher_maps, teacher_fused, teacher_s = explain(teacher, TEACHER_LEVELS, images, labels)
    student_maps, student_fused, student_s = explain(student, STUDENT_LEVELS, images, labels)
    for t_level, s_level in zip(TEACHER_LEVELS, STUDENT_LEVELS, strict=True):
        agreement = explanation_agreement(teacher_maps[t_level], student_maps[s_level], "cc").mean()
        print(f"  Grad-CAM agreement (cc) {t_level} vs {s_level}: {agreement:.2f}")
    print(f"  fused maps: agreement (cc) {explanation_agreement(teacher_fused, student_fused).mean():.2f}, "
          f"pointing game teacher {pointing_game(teacher_fused, masks, tolerance=1).mean():.2f}, "
          f"student {pointing_game(student_fused, masks, tolerance=1).mean():.2f} ({len(test)} lesion volumes)")
    print(f"seconds per hierarchical explanation: teacher {teacher_s:.3f}, student {student_s:.3f}")

    def arrays(levels, per_level, fused, short):
        maps = {short(level): per_level[level][0, 0].cpu().numpy() for level in levels}
        return {**maps, "fused": fused[0, 0].cpu().numpy()}

    cam_figure(
        images[0, 0].cpu().numpy(),
        masks[0, 0].cpu().numpy(),
        {
            "teacher": arrays(TEACHER_LEVELS, teacher_maps, teacher_fused, lambda p: p.replace("features.", "")),
            "student": arrays(STUDENT_LEVELS, student_maps, student_fused, str),
        },
        out / "teacher_vs_student_cams.png",
        f"Grad-CAM for class {class_names('brain-mri-3d')[labels[0]]!r}: DenseNet121 teacher vs distilled ShallowCNN",
    )
    return {"3D (KD + attention)": parts}


def part_2d(quick: bool) -> dict[str, dict[str, list[float]]]:
    n, epochs = (48, 2) if quick else (120, 8)
    samples = generate_dataset("chest-xray-2d", n=n, seed=0, spatial_size=64, lesion_size=(10.0, 20.0))
    classes = len(class_names("chest-xray-2d"))
    transform = Compose([NormalizeIntensityd(keys="image"), EnsureTyped(keys="image", dtype=torch.float32)])
    items = {
        split: [{"image": s.image[None], "label": s.label} for s in samples if s.split == split]
        for split in ("training", "test")
    }
    train = DataLoader(Dataset(items["training"], transform), batch_size=8, shuffle=True)
    test = DataLoader(Dataset(items["test"], transform), batch_size=8)
    teacher = DenseNet121(spatial_dims=2, in_channels=1, out_channels=classes, init_features=16, growth_rate=8)
    student = ShallowCNN(spatial_dims=2, in_channels=1, out_channels=classes, channels=(8, 16, 32, 32))
    teacher, student = teacher.to(DEVICE), student.to(DEVICE)
    train_teacher(teacher, train, epochs)
    # a single term is a valid loss too: the trainer wraps it in a DistillationLoss
    parts = distil(student, teacher, KnowledgeDistillationLoss(temperature=2.0, alpha=0.5), train, epochs,
                   ["task", "kd", "loss"])  # fmt: skip
    print(f"2D: parameters teacher {count_parameters(teacher):,}, student {count_parameters(student):,}; "
          f"test accuracy teacher {accuracy(teacher, test):.3f}, student {accuracy(student, test):.3f} "
          f"({len(items['test'])} radiographs of 64²); last epoch " +
          ", ".join(f"{k} {v[-1]:.3f}" for k, v in parts.items()))  # fmt: skip
    return {"2D (KD only)": parts}


def loss_figure(runs: dict[str, dict[str, list[float]]], path: Path) -> None:
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.2), squeeze=False)
    for ax, (name, parts) in zip(axes[0], runs.items(), strict=True):
        for key, values in parts.items():
            ax.plot(range(1, len(values) + 1), values, marker="o", label=key, linestyle="--" if key == "loss" else "-")
        ax.set(title=name, xlabel="epoch", ylabel="mean over the epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("distillation loss parts from engine.state.output", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few samples and epochs")
    parser.add_argument("--out", default="runs/tutorial_02")
    args = parser.parse_args()
    if args.quick:
        torch.set_num_threads(1)
    set_determinism(seed=0)  # torch, numpy and MONAI's random transforms
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = part_3d(out, args.quick)
    runs.update(part_2d(args.quick))
    loss_figure(runs, out / "distillation_losses.png")
    print(f"figures in {out}")


if __name__ == "__main__":
    main()
