"""Tutorial 3: relevance pruning: remove the channels that matter least to the model's decisions.

Run it with ``.venv/bin/python tutorials/03_relevance_pruning.py [--quick] [--out DIR]``.

1. Write the 3D brain MRI dataset (NIfTI + MONAI datalist), read it with MONAI dictionary transforms and train
   a :class:`~monai_kdx.networks.ShallowCNN` briefly with MONAI's ``SupervisedTrainer``.
2. Score every channel of every convolution and linear layer on calibration data (the training split without
   augmentation, as MONAI dict batches) with :func:`~monai_kdx.pruning.collect_relevance` and four registered
   methods: ``lrp`` (zennit), ``ig`` (integrated gradients read at each layer), ``taylor`` (gradient ×
   activation) and the data-free ``magnitude`` baseline; print how far their channel rankings agree.
3. Prune half the channels of every layer with :func:`~monai_kdx.pruning.prune_by_relevance` (``ratio=0.5``;
   the LRP scores from step 2 are passed with ``relevance=`` so they are not computed twice; the caller's
   network is left as it was; the classifier head keeps its outputs), and once more by weight magnitude.
   Compare parameters and MACs (``count_parameters``, ``count_macs``) and test accuracy before pruning, right
   after it and after a short fine-tune.
4. Save the pruned network with :func:`~monai_kdx.pruning.save_pruned` (architecture spec + weights, no pickled
   modules: the file opens with ``torch.load(weights_only=True)``), load it back with
   :func:`~monai_kdx.pruning.load_pruned` and check that both give the same outputs.
5. ``DIR/pruning.png``: channels per layer before and after, and the relevance of each channel of one layer
   under each method, with the channels LRP pruning kept.
6. 2D, in short: :class:`~monai_kdx.handlers.RelevancePruningHandler` prunes a chest radiograph classifier
   inside a ``SupervisedTrainer`` at the start of an epoch; the remaining epochs fine-tune it, and the handler
   reports its measurements.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from ignite.metrics import Accuracy
from monai.data import CacheDataset, DataLoader, Dataset
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.transforms import Compose, EnsureTyped, LoadImaged, NormalizeIntensityd, RandFlipd, SelectItemsd
from monai.utils import set_determinism
from scipy.stats import spearmanr

from monai_kdx.data import class_names, generate_dataset, load_datalist, write_dataset
from monai_kdx.handlers import RelevancePruningHandler, stacked
from monai_kdx.networks import ShallowCNN, count_macs, count_parameters
from monai_kdx.pruning import (
    collect_relevance,
    find_head,
    load_pruned,
    prunable_layers,
    prune_by_relevance,
    save_pruned,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KNOBS_3D = {"lesion_size": (20.0, 32.0), "lesion_contrast": (0.4, 0.8)}  # visible at 32³
METHODS = ("lrp", "ig", "taylor", "magnitude")
SHOWN_LAYER, SHOWN_NORM = "blocks.2.0", "blocks.2.1"  # the convolution of the third block (32 channels), its BN


def loaders(datalist: Path, batch_size: int) -> dict[str, DataLoader]:
    """Training (augmented), calibration (the training split, not augmented) and test loaders."""
    load = [
        LoadImaged(keys="image", ensure_channel_first=True),
        NormalizeIntensityd(keys="image"),
        EnsureTyped(keys="image", dtype=torch.float32),
        SelectItemsd(keys=["image", "label"]),
    ]
    training = CacheDataset(load_datalist(datalist, "training"), Compose(load), progress=False)
    augmented = Dataset(training, RandFlipd(keys="image", prob=0.5, spatial_axis=0))  # flips on the cached items
    test = CacheDataset(load_datalist(datalist, "test"), Compose(load), progress=False)
    return {
        "training": DataLoader(augmented, batch_size=batch_size, shuffle=True),
        "calibration": DataLoader(training, batch_size=batch_size),
        "test": DataLoader(test, batch_size=batch_size),
    }


def train(network: torch.nn.Module, loader: DataLoader, epochs: int, handlers=None) -> SupervisedTrainer:
    trainer = SupervisedTrainer(
        device=DEVICE,
        max_epochs=epochs,
        train_data_loader=loader,
        network=network,
        optimizer=torch.optim.Adam(network.parameters(), lr=1e-3),
        loss_function=torch.nn.CrossEntropyLoss(),
        train_handlers=handlers,
    )
    trainer.run()
    return trainer


def accuracy(network: torch.nn.Module, loader: DataLoader) -> float:
    """Accuracy on a loader through MONAI's ``SupervisedEvaluator``."""
    metric = Accuracy(output_transform=stacked(["pred", "label"]))
    evaluator = SupervisedEvaluator(DEVICE, loader, network, key_val_metric={"accuracy": metric})
    evaluator.run()
    return float(evaluator.state.metrics["accuracy"])


def widths(network: torch.nn.Module) -> dict[str, int]:
    """Output channels (or features) of every prunable layer."""
    layers = prunable_layers(network)
    return {path: getattr(m, "out_channels", getattr(m, "out_features", 0)) for path, m in layers.items()}


def kept_channels(original: torch.nn.Module, pruned: torch.nn.Module, norm_path: str) -> list[int]:
    """Which channels of ``original`` survive in ``pruned``, found by matching the per-channel statistics of a
    batch norm (weight, bias, running mean and variance are copied unchanged by the pruning)."""

    def stats(network):
        norm = network.get_submodule(norm_path)
        return torch.stack([norm.weight, norm.bias, norm.running_mean, norm.running_var], dim=1).detach()

    return torch.cdist(stats(pruned), stats(original)).argmin(dim=1).tolist()


def figure(before, after, relevance, kept, path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [1, 1.4]})
    names = list(before)
    x = np.arange(len(names))
    left.bar(x - 0.2, [before[n] for n in names], 0.4, label="before")
    left.bar(x + 0.2, [after[n] for n in names], 0.4, label="after (lrp, ratio 0.5)")
    left.set_xticks(x, names, rotation=45, ha="right", fontsize=7)
    left.set(ylabel="output channels", title="channels per layer")
    left.legend(fontsize=8, loc="upper left")
    channels = np.arange(len(relevance[METHODS[0]]))
    width = 0.8 / len(relevance)
    for i, (method, values) in enumerate(relevance.items()):
        values = values.numpy() / max(float(values.max()), 1e-12)
        right.bar(channels + (i - len(relevance) / 2 + 0.5) * width, values, width, label=method)
    right.scatter(kept, np.full(len(kept), 1.08), marker="v", color="black", s=14, label="kept by lrp pruning")
    right.set(xlabel=f"channel of {SHOWN_LAYER}", ylabel="relevance / max", title="channel relevance by method")
    right.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def part_3d(out: Path, quick: bool) -> None:
    n, epochs, tune_epochs = (48, 3, 1) if quick else (160, 12, 4)
    classes = len(class_names("brain-mri-3d"))
    datalist = write_dataset(out / "brain", kind="brain-mri-3d", n=n, seed=0, spatial_size=32, progress=False,
                             **KNOBS_3D)  # fmt: skip
    data = loaders(datalist, batch_size=4)
    network = ShallowCNN(spatial_dims=3, in_channels=1, out_channels=classes).to(DEVICE)
    train(network, data["training"], epochs)
    print(f"3D: ShallowCNN trained {epochs} epochs on {len(data['calibration'].dataset)} volumes of 32³")

    # 1. channel relevance by four methods, on the same calibration batches
    relevance = {method: collect_relevance(network, data["calibration"], method) for method in METHODS}
    head = find_head(network, next(iter(data["calibration"]))["image"][:1].to(DEVICE))  # never pruned
    pruned_layers = [path for path in relevance["lrp"] if path != head]
    for method in METHODS[1:]:
        rho = np.mean([spearmanr(relevance["lrp"][p], relevance[method][p])[0] for p in pruned_layers])
        print(f"  channel ranking agreement with lrp (mean Spearman over layers): {method} {rho:.2f}")

    # 2. prune half the channels: by LRP relevance (precomputed above) and by weight magnitude
    builder = {"network": "ShallowCNN", "spatial_dims": 3, "in_channels": 1,
               "out_channels": classes}  # fmt: skip
    pruned = {
        method: prune_by_relevance(network, data["calibration"], ratio=0.5, method=method,
                                   relevance=relevance["lrp"] if method == "lrp" else None, builder=builder)
        for method in ("lrp", "magnitude")
    }  # fmt: skip
    kept = kept_channels(network, pruned["lrp"], SHOWN_NORM)
    shape = (1, 32, 32, 32)
    params, macs = count_parameters(network), count_macs(network, shape)
    small = pruned["lrp"]
    print(f"parameters: {params:,} -> {count_parameters(small):,} ({count_parameters(small) / params:.2f}x); "
          f"MACs: {macs:,} -> {count_macs(small, shape):,} ({count_macs(small, shape) / macs:.2f}x)")
    print(f"  test accuracy before pruning: {accuracy(network, data['test']):.3f} "
          f"({len(data['test'].dataset)} volumes, chance {1 / classes:.2f})")
    for method, model in pruned.items():
        right_after = accuracy(model, data["test"])
        tuned = copy.deepcopy(model)  # fine-tune a copy: `model` is saved below exactly as pruned
        train(tuned, data["training"], tune_epochs)
        print(f"  {method:9s} ratio 0.5: test accuracy right after pruning {right_after:.3f}, "
              f"after {tune_epochs} fine-tuning epochs {accuracy(tuned, data['test']):.3f}")

    # 3. save without pickled modules, load back, compare outputs
    path = save_pruned(small, out / "pruned_lrp.pt", metadata={"ratio": 0.5, "method": "lrp"})
    payload = torch.load(path, weights_only=True)  # plain tensors and data: nothing is unpickled
    print(f"saved {Path(path).name}: format {payload['format']!r}, network {payload['builder']['network']}, "
          f"{len(payload['modules'])} resized layers, metadata {payload['metadata']}")
    loaded = load_pruned(path).to(DEVICE).eval()
    small.eval()
    images = next(iter(data["test"]))["image"].to(DEVICE)
    with torch.no_grad():
        same = torch.allclose(small(images), loaded(images), atol=1e-5)
    print(f"outputs match after reload: {same}")

    relevance_shown = {method: scores[SHOWN_LAYER] for method, scores in relevance.items()}
    figure(widths(network), widths(small), relevance_shown, kept, out / "pruning.png")


def part_2d(quick: bool) -> None:
    n, epochs = (48, 2) if quick else (160, 8)
    samples = generate_dataset("chest-xray-2d", n=n, seed=0, spatial_size=64, lesion_size=(10.0, 20.0))
    classes = len(class_names("chest-xray-2d"))
    transform = Compose([NormalizeIntensityd(keys="image"), EnsureTyped(keys="image", dtype=torch.float32)])
    items = [{"image": s.image[None], "label": s.label} for s in samples if s.split == "training"]
    calibration = DataLoader(Dataset(items, transform), batch_size=8)
    network = ShallowCNN(spatial_dims=2, in_channels=1, out_channels=classes, channels=(8, 16, 32, 32)).to(DEVICE)
    params = count_parameters(network)
    pruning = RelevancePruningHandler(
        calibration,
        ratio=0.5,
        epochs=epochs // 2 + 1,  # train first, prune at the start of this epoch, fine-tune in the remaining ones
        method="taylor",
        gate_batches=1,  # explain one calibration batch before and after to measure the agreement
        latency_repeats=0,
    )
    trainer = train(network, DataLoader(Dataset(items, transform), batch_size=8, shuffle=True), epochs, [pruning])
    step = pruning.report[0]
    print(f"2D: RelevancePruningHandler at epoch {step['epoch']} ({step['method']}): parameters {params:,} -> "
          f"{count_parameters(trainer.network):,}; accuracy on the calibration data {step['accuracy_before']:.3f} -> "
          f"{step['accuracy_after']:.3f} right after pruning; Grad-CAM agreement {step['agreement']:.2f}; "
          f"accepted {step['accepted']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few samples and epochs")
    parser.add_argument("--out", default="runs/tutorial_03")
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
