"""Saliency regularization benchmarks: saliency-guided training against the same training without the
saliency loss, on the gaze maps of the 2D and 3D datasets and on their shortcut variants, and the cost
of a guided step. Training runs through MONAI's SupervisedTrainer with the SaliencyGuidance handler
(the bundles' path); saliency is the trained layer's Grad-CAM for the true class."""

from __future__ import annotations

import time
from typing import Any

from common import benchmark, results_dir, timed

# dataset kind → (spatial size, samples, epochs, batch size) of the full run; --quick shrinks them
SETTINGS = {"chest-xray-2d": (64, 400, 20, 16), "brain-mri-3d": (48, 240, 15, 8)}
QUICK = {"chest-xray-2d": (32, 24, 2, 8), "brain-mri-3d": (32, 24, 2, 4)}  # ShallowCNN halves 5 times
LAYER = "blocks.1"  # ShallowCNN block 1: 1/4 of the input resolution
LOSS = {"method": "gradcam", "divergence": "kl"}
WEIGHT = 1.0


def _split_tensors(samples: list, split: str) -> dict[str, Any]:
    """Stacked (N, 1, *spatial) images, gaze heatmaps, binary fixation maps and marker masks of one split."""
    import numpy as np
    import torch

    from monai_kdx.data.gaze import fixations_to_binary_map

    chosen = [s for s in samples if s.split == split]
    shape = chosen[0].image.shape
    fixations = [fixations_to_binary_map(np.asarray(s.fixations)[:, : len(shape)], shape) for s in chosen]
    markers = [s.marker_mask if s.marker_mask is not None else np.zeros(shape, np.uint8) for s in chosen]

    def stack(arrays: list) -> torch.Tensor:
        return torch.as_tensor(np.stack(arrays)[:, None]).float()

    return {
        "image": stack([s.image for s in chosen]),
        "gaze": stack([s.gaze for s in chosen]),
        "fixations": stack(fixations),
        "marker": stack(markers),
        "label": torch.tensor([s.label for s in chosen]),
    }


def _data(kind: str, quick: bool, **knobs: Any) -> tuple[dict[str, Any], dict[str, Any], int, int, tuple]:
    from monai_kdx.data import generate_dataset

    size, n, epochs, batch = (QUICK if quick else SETTINGS)[kind]
    samples = generate_dataset(kind, n=n, seed=0, spatial_size=size, progress=not quick, **knobs)
    classes = len({s.label for s in samples})
    return _split_tensors(samples, "training"), _split_tensors(samples, "test"), classes, epochs, (size, n, batch)


def _train(train: dict[str, Any], classes: int, epochs: int, batch: int, guided: bool, seed: int = 0) -> Any:
    """A ShallowCNN trained by SupervisedTrainer on ``train``, with or without SaliencyGuidance (same seed)."""
    import torch
    from monai.engines import SupervisedTrainer

    from monai_kdx.handlers import SaliencyGuidance
    from monai_kdx.losses import SaliencyAlignmentLoss
    from monai_kdx.networks import ShallowCNN

    torch.manual_seed(seed)
    spatial_dims = train["image"].ndim - 2
    network = ShallowCNN(spatial_dims, 1, classes)
    keys = ("image", "label", "gaze")
    items = [{k: train[k][i] for k in keys} for i in range(len(train["label"]))]
    loader = torch.utils.data.DataLoader(
        items, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    handlers = (
        [SaliencyGuidance(SaliencyAlignmentLoss(LAYER, **LOSS), target_key="gaze", weight=WEIGHT)] if guided else []
    )
    SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=epochs,
        train_data_loader=loader,
        network=network,
        optimizer=torch.optim.Adam(network.parameters(), lr=1e-3),
        loss_function=torch.nn.CrossEntropyLoss(),
        train_handlers=handlers,
    ).run()
    return network.eval()


def _evaluate(network: Any, test: dict[str, Any]) -> dict[str, float]:
    """Test accuracy, and KL / NSS / CC of the true class's Grad-CAM at LAYER against the gaze (samples with
    gaze), and the share of the saliency on the shortcut marker (samples with a marker)."""
    import torch

    from monai_kdx.explain import HierarchicalCAM
    from monai_kdx.metrics import saliency_cc, saliency_kl, saliency_nss

    with torch.no_grad():
        predictions = torch.cat([network(x).argmax(1) for x in test["image"].split(8)])
    cam = HierarchicalCAM(network, [LAYER], mode="gradcam")
    maps = torch.cat(
        [cam.cam(x, y)[LAYER] for x, y in zip(test["image"].split(8), test["label"].split(8), strict=True)]
    )
    has_gaze = test["gaze"].flatten(1).amax(1) > 0
    marker = test["marker"].flatten(1)
    has_marker = marker.amax(1) > 0
    flat = maps.flatten(1)
    share = (flat * marker).sum(1) / flat.sum(1).clamp_min(1e-12)
    return {
        "accuracy": (predictions == test["label"]).float().mean().item(),
        "kl": saliency_kl(maps[has_gaze], test["gaze"][has_gaze]).mean().item(),
        "nss": saliency_nss(maps[has_gaze], test["fixations"][has_gaze]).mean().item(),
        "cc": saliency_cc(maps[has_gaze], test["gaze"][has_gaze]).mean().item(),
        "marker_share": share[has_marker].mean().item() if has_marker.any() else float("nan"),
    }


def _with_and_without(kind: str, quick: bool, **knobs: Any) -> dict[str, Any]:
    train, test, classes, epochs, (size, n, batch) = _data(kind, quick, **knobs)
    result: dict[str, Any] = {"spatial_size": size, "samples": n, "epochs": epochs, "batch_size": batch}
    for name, guided in (("plain", False), ("guided", True)):
        start = time.perf_counter()
        network = _train(train, classes, epochs, batch, guided)
        result[name] = {**_evaluate(network, test), "train_s": time.perf_counter() - start}
    return result


def _nss_gain(plain: float, guided: float) -> float:
    """Relative NSS increase (the published +216% is 2.16); NSS can be negative, so relative to |plain|."""
    return (guided - plain) / max(abs(plain), 1e-6)


@benchmark
def saliency_alignment(quick: bool) -> dict[str, Any]:
    """KL and NSS of the trained model's saliency against gaze on the test split, with and without the
    saliency loss (targets: KL −90%, NSS +216%, accuracy within 1 point), in 2D and 3D."""
    runs = {kind: _with_and_without(kind, quick) for kind in SETTINGS}
    result: dict[str, Any] = {"layer": LAYER, "loss": LOSS, "weight": WEIGHT, "runs": runs}
    for kind, run in runs.items():
        key = kind.split("-")[-1]
        plain, guided = run["plain"], run["guided"]
        result[f"ratio_kl_guided_to_plain_{key}"] = guided["kl"] / plain["kl"]
        result[f"ratio_nss_gain_{key}"] = _nss_gain(plain["nss"], guided["nss"])
        result[f"accuracy_change_points_{key}"] = 100 * (guided["accuracy"] - plain["accuracy"])
    result["targets"] = {
        "ratio_kl_guided_to_plain": "<= 0.1",
        "ratio_nss_gain": ">= 2.16",
        "accuracy_change_points": ">= -1",
    }
    _write_table(result, "saliency_alignment", ("accuracy", "kl", "nss", "cc"))
    return result


@benchmark
def saliency_shortcut(quick: bool) -> dict[str, Any]:
    """The shortcut variant: a corner marker follows the label in training (p = 0.9) and not at test. Test
    accuracy and the share of saliency on the marker, with and without the saliency loss, in 2D and 3D."""
    runs = {kind: _with_and_without(kind, quick, shortcut_p=0.9) for kind in SETTINGS}
    result: dict[str, Any] = {"shortcut_p": 0.9, "layer": LAYER, "loss": LOSS, "weight": WEIGHT, "runs": runs}
    for kind, run in runs.items():
        key = kind.split("-")[-1]
        result[f"ratio_marker_share_guided_to_plain_{key}"] = run["guided"]["marker_share"] / max(
            run["plain"]["marker_share"], 1e-12
        )
        result[f"accuracy_change_points_{key}"] = 100 * (run["guided"]["accuracy"] - run["plain"]["accuracy"])
    _write_table(result, "saliency_shortcut", ("accuracy", "marker_share", "kl"))
    return result


@benchmark
def saliency_step(quick: bool) -> dict[str, Any]:
    """One SupervisedTrainer iteration with SaliencyGuidance (Grad-CAM KL to gaze, create_graph) against the
    same iteration without it, on a 3D batch (target ≤ 2.5×), and the same for the other saliency losses."""
    import torch
    from monai.engines import SupervisedTrainer

    from monai_kdx.handlers import SaliencyGuidance
    from monai_kdx.losses import GAINLoss, RightForTheRightReasonsLoss, SaliencyAlignmentLoss
    from monai_kdx.networks import ShallowCNN

    size, batch, repeats = (32, 2, 3) if quick else (64, 8, 7)
    generator = torch.Generator().manual_seed(0)
    data = {
        "image": torch.randn(batch, 1, size, size, size, generator=generator),
        "label": torch.arange(batch) % 4,
        "gaze": torch.rand(batch, 1, size, size, size, generator=generator),
    }
    losses = {
        "plain": None,
        "gradcam_kl": SaliencyAlignmentLoss(LAYER, **LOSS),
        "input_gradient_kl": SaliencyAlignmentLoss(method="input_gradient"),
        "rrr": RightForTheRightReasonsLoss(),
        "gain": GAINLoss(LAYER),
    }
    seconds = {}
    for name, loss in losses.items():
        torch.manual_seed(0)
        network = ShallowCNN(3, 1, 4)
        trainer = SupervisedTrainer(
            device=torch.device("cpu"),
            max_epochs=1,
            train_data_loader=[data],
            network=network,
            optimizer=torch.optim.SGD(network.parameters(), lr=1e-4),
            loss_function=torch.nn.CrossEntropyLoss(),
            train_handlers=[SaliencyGuidance(loss)] if loss is not None else [],
            decollate=False,
        )
        trainer.run()  # attach-time checks and the first iteration
        seconds[name] = timed(lambda trainer=trainer: _fire_iteration(trainer, data), repeats)
    return {
        "input": [batch, 1, size, size, size],
        "network": "ShallowCNN(3, 1, 4)",
        "layer": LAYER,
        "seconds": seconds,
        **{f"ratio_{name}_to_plain_step": seconds[name] / seconds["plain"] for name in losses if name != "plain"},
        "target": "ratio_gradcam_kl_to_plain_step <= 2.5",
    }


def _fire_iteration(trainer: Any, data: dict[str, Any]) -> None:
    """One training iteration exactly as ignite runs it: ITERATION_STARTED, the step, ITERATION_COMPLETED."""
    from ignite.engine import Events

    trainer.state.batch = data
    trainer._fire_event(Events.ITERATION_STARTED)
    trainer.state.output = trainer._process_function(trainer, data)
    trainer._fire_event(Events.ITERATION_COMPLETED)


def _write_table(result: dict[str, Any], name: str, columns: tuple[str, ...]) -> None:
    """benchmarks/results/<name>.md: one row per (dataset, training) with the given metrics."""
    lines = [f"| dataset | training | {' | '.join(columns)} | train s |", "|---" * (len(columns) + 3) + "|"]
    for kind, run in result["runs"].items():
        for arm in ("plain", "guided"):
            values = " | ".join(f"{run[arm][c]:.3f}" for c in columns)
            lines.append(
                f"| {kind} ({run['spatial_size']}, n={run['samples']}) | {arm} | {values} | {run[arm]['train_s']:.0f} |"
            )
    (results_dir() / f"{name}.md").write_text("\n".join(lines) + "\n")
