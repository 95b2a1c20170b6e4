"""Tutorial 1: datasets with ground truth, and reading a network's feature maps.

Run it with ``.venv/bin/python tutorials/01_datasets_and_feature_capture.py [--quick] [--out DIR]``.

1. Generate the three semi-synthetic lesion datasets in memory and draw one sample per class
   (image, lesion outline, simulated gaze): ``DIR/preview_<kind>.png``.
2. Write the 3D dataset to disk as NIfTI + a MONAI datalist and load it back with ``LoadImaged``:
   the affine written is the affine read.
3. Capture a DenseNet121's feature maps at every dense block in one forward pass and show the
   channel-mean activation of each level (the "hierarchical" maps of the distillation research)
   next to the lesion: ``DIR/feature_levels.png``. The network here is untrained, so the maps show
   the mechanics, not a meaningful explanation; a level whose map is constant (1 voxel) is blank.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from monai.networks.nets import DenseNet121
from monai.transforms import LoadImaged

from monai_kdx.data import generate_dataset, load_datalist, write_dataset
from monai_kdx.networks import FeatureCapture
from monai_kdx.visualize import dataset_preview, draw_overlay, focus_point, planes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small images, few samples")
    parser.add_argument("--out", default="runs/tutorial_01")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size_3d, size_2d, n = (32, 64, 8) if args.quick else (64, 128, 12)

    # 1. three kinds, in memory
    for kind, size in (("brain-mri-3d", size_3d), ("chest-xray-2d", size_2d), ("retina-2d", size_2d)):
        samples = generate_dataset(kind, n=n, seed=0, spatial_size=size)
        dataset_preview(samples, out / f"preview_{kind}.png")
        sample = samples[0]
        print(f"{kind}: image {sample.image.shape}, classes {sorted({s.class_name for s in samples})}, "
              f"{len(sample.fixations)} fixations on sample 0")

    # 2. on disk, read back with MONAI
    datalist = write_dataset(out / "brain", kind="brain-mri-3d", n=n, seed=0, spatial_size=size_3d, progress=True)
    entry = load_datalist(datalist, "training")[0]
    loaded = LoadImaged(keys=["image", "mask"], ensure_channel_first=True)(entry)
    written = np.asarray(__import__("nibabel").load(entry["image"]).affine)
    print(f"loaded {os.path.basename(entry['image'])}: {tuple(loaded['image'].shape)}, "
          f"affine preserved: {np.allclose(loaded['image'].affine.numpy(), written)}")

    # 3. one forward pass, four levels
    torch.manual_seed(0)
    network = DenseNet121(spatial_dims=3, in_channels=1, out_channels=4, init_features=16, growth_rate=8).eval()
    levels = [f"features.denseblock{i}" for i in range(1, 5)]
    image = loaded["image"].as_tensor()[None]
    with torch.no_grad(), FeatureCapture(network, levels) as features:
        network(image)
    mask = loaded["mask"][0].numpy()
    point = focus_point(mask.shape, mask)
    fig, axes = plt.subplots(1, len(levels) + 1, figsize=(2.4 * (len(levels) + 1), 2.6))
    draw_overlay(axes[0], planes(image[0, 0].numpy(), point)[0], planes(mask, point)[0], title="image + lesion")
    for ax, name in zip(axes[1:], levels, strict=True):
        level = features[name].mean(dim=1, keepdim=True)  # channel mean: (1, 1, h, w, d)
        level = torch.nn.functional.interpolate(level, size=image.shape[2:], mode="trilinear")[0, 0].numpy()
        draw_overlay(ax, planes(image[0, 0].numpy(), point)[0], heatmap=planes(level, point)[0], title=name[9:])
        print(f"{name}: {tuple(features[name].shape)}")
    fig.suptitle("channel-mean activation per level (untrained DenseNet121)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "feature_levels.png", dpi=100)
    print(f"figures in {out}")


if __name__ == "__main__":
    main()
