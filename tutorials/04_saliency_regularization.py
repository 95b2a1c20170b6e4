"""Tutorial 4: saliency regularization: pull a classifier's Grad-CAM toward where radiologists look.

Run it with ``.venv/bin/python tutorials/04_saliency_regularization.py [--quick] [--out DIR]``.

1. Write the 3D brain MRI dataset (NIfTI + MONAI datalist). The training pipeline renders each volume's gaze
   heatmap from its fixation list with :class:`~monai_kdx.transforms.GazeToHeatmapd` (Gaussian width in mm,
   through the image's affine) after ``LoadImaged``; random flips then move image and gaze together.
2. Train the same :class:`~monai_kdx.networks.ShallowCNN` twice from the same initial weights with MONAI's
   ``SupervisedTrainer``: plain, and with the handler :class:`~monai_kdx.handlers.SaliencyGuidance`, which adds
   :class:`~monai_kdx.losses.SaliencyAlignmentLoss` (the differentiable Grad-CAM of the true class at
   ``blocks.2`` against the gaze map, divergence ``cc``) to the trainer's loss and records it in
   ``engine.state.output["saliency"]``.
3. Score the Grad-CAM of each test volume against the gaze with the saliency metrics of
   :mod:`monai_kdx.metrics` (NSS on the binary fixation map, CC and KL on the heatmap) for the untrained network,
   the plain one and the guided one; inference is unchanged (the guided checkpoint is a plain network).
4. ``DIR/gradcam_vs_gaze.png``: one test volume, the gaze next to the Grad-CAM of both networks.
5. 2D, in short: the loss used directly in a hand-written loop (``loss.context`` + ``loss.from_context``) on
   chest radiographs held in memory, with NSS before and after.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Events
from monai.data import CacheDataset, DataLoader, Dataset
from monai.engines import SupervisedTrainer
from monai.transforms import Compose, EnsureTyped, LoadImaged, NormalizeIntensityd, RandFlipd, SelectItemsd
from monai.utils import set_determinism

from monai_kdx.data import class_names, fixations_to_binary_map, generate_dataset, load_datalist, write_dataset
from monai_kdx.explain import HierarchicalCAM
from monai_kdx.handlers import SaliencyGuidance, scalars
from monai_kdx.losses import SaliencyAlignmentLoss
from monai_kdx.metrics import saliency_cc, saliency_kl, saliency_nss
from monai_kdx.networks import ShallowCNN
from monai_kdx.transforms import GazeToHeatmapd
from monai_kdx.visualize import PLANE_NAMES, draw_overlay, focus_point, planes

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KNOBS_3D = {"lesion_size": (20.0, 32.0), "lesion_contrast": (0.4, 0.8)}  # visible at 32³
LAYER = "blocks.2"  # 1/8 of the input size


def loaders(datalist: Path, batch_size: int) -> tuple[DataLoader, list[dict]]:
    """The training loader (image, gaze rendered from the fixations, label) and the test items, which carry the
    stored gaze heatmap, the lesion mask (for the figure) and a binary fixation map for NSS."""
    load = [
        LoadImaged(keys="image", ensure_channel_first=True),
        GazeToHeatmapd(keys="fixations", ref_key="image", output_key="gaze", sigma_mm=8.0),
        NormalizeIntensityd(keys="image"),
        EnsureTyped(keys=["image", "gaze"], dtype=torch.float32),
        SelectItemsd(keys=["image", "gaze", "label"]),
    ]
    training = CacheDataset(load_datalist(datalist, "training"), Compose(load), progress=False)
    flip = RandFlipd(keys=["image", "gaze"], prob=0.5, spatial_axis=0)  # the same flip for the image and its gaze
    train_loader = DataLoader(Dataset(training, flip), batch_size=batch_size, shuffle=True)

    test_load = Compose([
        LoadImaged(keys=["image", "gaze", "mask"], ensure_channel_first=True),  # the gaze map as stored
        NormalizeIntensityd(keys="image"),
        EnsureTyped(keys=["image", "gaze", "mask"], dtype=torch.float32),
    ])  # fmt: skip
    test = []
    for entry in load_datalist(datalist, "test"):
        item = test_load(entry)
        shape = item["image"].shape[1:]
        binary = fixations_to_binary_map(np.asarray(entry["fixations"])[:, :3], shape)  # drop the durations
        test.append({**item, "fixation_map": torch.as_tensor(binary, dtype=torch.float32)[None]})
    return train_loader, test


def train(network: torch.nn.Module, loader: DataLoader, epochs: int, handlers=None) -> dict[str, list[float]]:
    """Train with cross-entropy (plus whatever the handlers add); returns per-epoch means of the output scalars."""
    trainer = SupervisedTrainer(
        device=DEVICE,
        max_epochs=epochs,
        train_data_loader=loader,
        network=network,
        optimizer=torch.optim.Adam(network.parameters(), lr=1e-3),
        loss_function=torch.nn.CrossEntropyLoss(),
        train_handlers=handlers,
    )
    keys = ["loss", "saliency"] if handlers else ["loss"]
    history: dict[str, list[float]] = defaultdict(list)
    running: dict[str, list[float]] = defaultdict(list)
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: [running[k].append(v) for k, v in scalars(keys)(e.state.output).items()]
    )
    trainer.add_event_handler(
        Events.EPOCH_COMPLETED, lambda e: [history[k].append(float(np.mean(running.pop(k)))) for k in keys]
    )
    trainer.run()
    return history


def evaluate(network: torch.nn.Module, test: list[dict]) -> dict[str, float | torch.Tensor]:
    """Accuracy, and the Grad-CAM at ``LAYER`` of each test item's true class against its gaze."""
    images = torch.stack([t["image"].as_tensor() for t in test]).to(DEVICE)
    labels = torch.tensor([int(t["label"]) for t in test], device=DEVICE)
    gaze = torch.stack([t["gaze"].as_tensor() for t in test]).to(DEVICE)
    fixations = torch.stack([t["fixation_map"] for t in test]).to(DEVICE)
    network.eval()
    with torch.no_grad():
        predictions = network(images).argmax(1)
    maps = HierarchicalCAM(network, layers=[LAYER], mode="gradcam").cam(images, class_idx=labels)[LAYER]
    return {
        "accuracy": float((predictions == labels).float().mean()),
        "nss": float(saliency_nss(maps, fixations).mean()),
        "cc": float(saliency_cc(maps, gaze).mean()),
        "kl": float(saliency_kl(maps, gaze).mean()),
        "maps": maps.cpu(),
    }


def figure(test_item: dict, maps: dict[str, np.ndarray], path: Path) -> None:
    image, gaze, mask = (test_item[key][0].numpy() for key in ("image", "gaze", "mask"))
    point = focus_point(gaze.shape, gaze)  # the gaze peak
    panels = {"gaze (target)": gaze, **maps}
    fig, axes = plt.subplots(2, len(panels), figsize=(2.6 * len(panels), 5.2), squeeze=False)
    for column, (name, heatmap) in enumerate(panels.items()):
        for row in range(2):  # axial, coronal
            draw_overlay(axes[row, column], planes(image, point)[row], planes(mask, point)[row],
                         planes(heatmap, point)[row], title=f"{name} · {PLANE_NAMES[row]}")  # fmt: skip
    fig.suptitle(f"Grad-CAM at {LAYER} for the true class vs simulated gaze (red: lesion outline)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def part_3d(out: Path, quick: bool) -> None:
    n, epochs = (64, 8) if quick else (160, 12)
    classes = len(class_names("brain-mri-3d"))
    datalist = write_dataset(out / "brain", kind="brain-mri-3d", n=n, seed=0, spatial_size=32, progress=False,
                             **KNOBS_3D)  # fmt: skip
    train_loader, test = loaders(datalist, batch_size=4)
    rendered = train_loader.dataset.data[0]["gaze"]
    stored = LoadImaged(keys="gaze", ensure_channel_first=True)(load_datalist(datalist, "training")[0])["gaze"]
    print(f"3D: {len(train_loader.dataset)} training / {len(test)} test volumes of 32³; gaze rendered from the "
          f"fixations vs the stored map: max difference {float((rendered - stored).abs().max()):.1e}")

    torch.manual_seed(0)
    initial = ShallowCNN(spatial_dims=3, in_channels=1, out_channels=classes).to(DEVICE).state_dict()
    results = {}
    for name in ("untrained", "plain", "saliency-guided"):
        network = ShallowCNN(spatial_dims=3, in_channels=1, out_channels=classes).to(DEVICE)
        network.load_state_dict(initial)  # the same start for every arm
        set_determinism(seed=1)  # the same batches and flips for both trainings
        if name == "plain":
            train(network, train_loader, epochs)
        elif name == "saliency-guided":
            guidance = SaliencyGuidance(
                SaliencyAlignmentLoss(LAYER, method="gradcam", divergence="cc"), target_key="gaze", weight=1.0
            )
            history = train(network, train_loader, epochs, [guidance])
            print("  saliency loss per epoch (1 - CC on the training batches): "
                  + ", ".join(f"{v:.3f}" for v in history["saliency"]))  # fmt: skip
        results[name] = evaluate(network, test)
    print(f"  Grad-CAM at {LAYER} of the true class vs gaze, {len(test)} test volumes:")
    print(f"  {'training':16s} accuracy   NSS ↑   CC ↑   KL ↓")
    for name, r in results.items():
        print(f"  {name:16s} {r['accuracy']:8.3f} {r['nss']:7.2f} {r['cc']:6.2f} {r['kl']:6.2f}")
    for metric in ("nss", "cc"):
        print(f"{metric.upper()} to gaze: " + ", ".join(f"{name} {r[metric]:.2f}" for name, r in results.items()))

    shown = next(i for i, t in enumerate(test) if int(t["label"]) != 0)  # a volume with a lesion
    maps = {name: results[name]["maps"][shown, 0].numpy() for name in ("plain", "saliency-guided")}
    figure(test[shown], maps, out / "gradcam_vs_gaze.png")


def part_2d(quick: bool) -> None:
    n, epochs = (48, 3) if quick else (160, 8)
    samples = generate_dataset("chest-xray-2d", n=n, seed=0, spatial_size=64, lesion_size=(10.0, 20.0))
    classes = len(class_names("chest-xray-2d"))

    def tensors(split):
        chosen = [s for s in samples if s.split == split]
        images = torch.stack([torch.as_tensor(s.image)[None] for s in chosen])
        images = (images - images.mean(dim=(1, 2, 3), keepdim=True)) / images.std(dim=(1, 2, 3), keepdim=True)
        gaze = torch.stack([torch.as_tensor(s.gaze)[None] for s in chosen])
        binary = [fixations_to_binary_map(np.asarray(s.fixations)[:, :2], s.image.shape) for s in chosen]
        binary = torch.stack([torch.as_tensor(b)[None] for b in binary])
        labels = torch.tensor([s.label for s in chosen])
        return images.to(DEVICE), gaze.to(DEVICE), binary.float().to(DEVICE), labels.to(DEVICE)

    (images, gaze, _, labels), (test_images, _, test_fixations, test_labels) = tensors("training"), tensors("test")
    torch.manual_seed(0)
    network = ShallowCNN(spatial_dims=2, in_channels=1, out_channels=classes, channels=(8, 16, 32, 32)).to(DEVICE)
    loss = SaliencyAlignmentLoss(LAYER, method="gradcam", divergence="cc")

    def nss() -> float:
        maps = HierarchicalCAM(network, layers=[LAYER]).cam(test_images, class_idx=test_labels)[LAYER]
        return float(saliency_nss(maps, test_fixations).mean())

    before = nss()
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
    for _ in range(epochs):
        network.train()
        for index in torch.randperm(len(images)).split(8):
            context = loss.context(network, images[index], labels[index], gaze[index])  # one forward, features kept
            total = F.cross_entropy(context.logits, labels[index]) + loss.from_context(context)
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
    print(f"2D: hand-written loop with SaliencyAlignmentLoss on {len(images)} radiographs of 64²: "
          f"test NSS to the fixations {before:.2f} untrained -> {nss():.2f} after {epochs} epochs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few samples and epochs")
    parser.add_argument("--out", default="runs/tutorial_04")
    args = parser.parse_args()
    if args.quick:
        torch.set_num_threads(1)
    set_determinism(seed=0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    part_3d(out, args.quick)
    part_2d(args.quick)
    print(f"figures in {out}")


if __name__ == "__main__":
    main()
