"""Saliency regularization benchmarks: saliency-guided training against the same training without the
saliency loss, on the gaze maps of the 2D and 3D datasets and on their shortcut variants, and the cost
of a guided step. Training runs through the real bundles (train_teacher.yaml training the bundle's student for the
plain arm, saliency_train.yaml for the guided arm); the saliency scored on the test split is the one the guided arm
was trained on: saliency_train.yaml's method and layers (by default LayerCAM fused over every stage) for the true
class."""

from __future__ import annotations

from typing import Any

from common import benchmark, results_dir

from monai_kdx.networks import median_seconds

BUNDLES = {"chest_xray_2d": 2, "brain_mri_3d": 3}
GUIDANCE_KEYS = ("saliency_layer", "saliency_method", "saliency_divergence", "saliency_weight")
GAIN_LAYER = "blocks.2"  # GAIN's attention-mining layer in the step benchmark (one layer)
# the full run uses each bundle's defaults (chest: 640 images of 128², brain: 400 volumes of 32³; training stops on
# a validation plateau or the epoch cap, no time budget)
QUICK = {"n_samples": 16, "spatial_size": 32, "max_epochs": 1, "patience": 1, "batch_size": 4}
SHORTCUT_P = 0.9


def _student_and_guidance(bundle: str) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """The bundle's student spec (``student_def``), saliency_train.yaml's guidance settings and its saliency loss
    (``saliency_loss``, a fresh object: its layers are resolved on first use)."""
    from monai_kdx.apps.pipeline import bundle_parser

    parser = bundle_parser(bundle, ["train_teacher.yaml", "saliency_train.yaml"])
    guidance = {key: parser.get_parsed_content(key) for key in GUIDANCE_KEYS}
    return parser.get_parsed_content("student_def"), guidance, parser.get_parsed_content("saliency_loss")


def _test_split(datalist: str, spatial_dims: int) -> dict[str, Any]:
    """The test split as the bundles' evaluation sees it (LoadImaged + NormalizeIntensityd): (N, 1, *spatial)
    images, gaze heatmaps, binary fixation maps and shortcut-marker masks (zeros without a marker), (N,) labels."""
    import numpy as np
    import torch
    from monai.transforms import LoadImage, NormalizeIntensity

    from monai_kdx.data import load_datalist
    from monai_kdx.data.gaze import fixations_to_binary_map

    load = LoadImage(image_only=True, ensure_channel_first=True)
    entries = load_datalist(datalist, "test")
    images = [NormalizeIntensity()(load(e["image"])).as_tensor().float() for e in entries]
    gaze = [load(e["gaze"]).as_tensor().float() for e in entries]
    shape = tuple(images[0].shape[1:])
    fixations = [
        torch.as_tensor(fixations_to_binary_map(np.asarray(e["fixations"])[:, :spatial_dims], shape))[None].float()
        for e in entries
    ]
    markers = [load(e["marker"]).as_tensor().float() if "marker" in e else torch.zeros(1, *shape) for e in entries]
    return {
        "image": torch.stack(images),
        "gaze": torch.stack(gaze),
        "fixations": torch.stack(fixations),
        "marker": torch.stack(markers),
        "label": torch.tensor([int(e["label"]) for e in entries]),
    }


def _evaluate(network: Any, test: dict[str, Any], loss: Any) -> dict[str, float]:
    """Test accuracy; KL / NSS / CC of the true class's guided saliency (the CAM of saliency_train.yaml's ``loss``,
    at its layers, fused) against the gaze (samples with gaze); the share of that saliency on the shortcut marker
    (samples with a marker)."""
    import torch

    from monai_kdx.explain import HierarchicalCAM
    from monai_kdx.metrics import saliency_cc, saliency_kl, saliency_nss

    with torch.no_grad():
        predictions = torch.cat([network(x).argmax(1) for x in test["image"].split(8)])
    loss.resolve_layers(network, test["image"][:1])  # "stages" or the deepest stage, as in training
    cam = HierarchicalCAM(network, list(loss.layers), mode=loss.method)
    batches = zip(test["image"].split(8), test["label"].split(8), strict=True)
    maps = torch.cat([cam.cam(x, y).fused.detach() for x, y in batches])
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


def _with_and_without(bundle: str, quick: bool, shortcut_p: float = 0.0) -> dict[str, Any]:
    """The bundle's student trained by train_teacher.yaml alone (plain) and with saliency_train.yaml (guided), same
    data, seed and stopping rules; each evaluated from its best-validation checkpoint."""
    import os
    import tempfile

    from monai_kdx.apps.pipeline import run_bundle
    from monai_kdx.networks import load_network

    student_def, guidance, loss = _student_and_guidance(bundle)
    settings: dict[str, Any] = dict(QUICK) if quick else {}
    result: dict[str, Any] = {"student_def": student_def, "guidance": guidance}
    with tempfile.TemporaryDirectory() as folder:
        settings.update(output_dir=folder, dataset_dir=os.path.join(folder, "data"))
        if shortcut_p:
            settings["datalist"] = (
                "$monai_kdx.data.ensure_dataset(@dataset_dir, kind=@dataset_kind, n=@n_samples, seed=@seed, "
                f"spatial_size=@spatial_size, shortcut_p={shortcut_p})"
            )
        plain = {"network_spec": "@student_def", "ckpt_dir": os.path.join(folder, "plain")}
        arms = {  # the same student, data, seed and stopping rules; the guided arm adds the saliency loss
            "plain": (["train_teacher.yaml"], plain),
            "guided": (["train_teacher.yaml", "saliency_train.yaml"], {}),
        }
        for name, (configs, extra) in arms.items():
            run_bundle(bundle, configs, ["train#trainer"], **settings, **extra, run_name=f"train_{name}")
        test = _test_split(os.path.join(folder, "data", "datalist.json"), BUNDLES[bundle])
        for name, checkpoint_dir in (("plain", "plain"), ("guided", "saliency")):
            network = load_network(student_def, os.path.join(folder, checkpoint_dir, "model.pt"))
            result[name] = _evaluate(network.eval(), test, loss)
        result["settings"] = {k: v for k, v in settings.items() if k not in ("output_dir", "dataset_dir")}
        result["test_samples"] = int(len(test["label"]))
    return result


def _nss_gain(plain: float, guided: float) -> float:
    """Relative NSS increase (the published +216% is 2.16); NSS can be negative, so relative to |plain|."""
    return (guided - plain) / max(abs(plain), 1e-6)


@benchmark
def saliency_alignment(quick: bool) -> dict[str, Any]:
    """KL and NSS of the trained model's saliency against gaze on the test split, with and without the
    saliency loss (targets: KL −90%, NSS +216%, accuracy within 1 point), in 2D and 3D."""
    runs = {bundle: _with_and_without(bundle, quick) for bundle in BUNDLES}
    result: dict[str, Any] = {"runs": runs}
    for kind, run in runs.items():
        key = f"{BUNDLES[kind]}d"
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
    runs = {bundle: _with_and_without(bundle, quick, shortcut_p=SHORTCUT_P) for bundle in BUNDLES}
    result: dict[str, Any] = {"shortcut_p": SHORTCUT_P, "runs": runs}
    for kind, run in runs.items():
        key = f"{BUNDLES[kind]}d"
        # shares under 0.1% are noise: the ratio is taken against at least that
        result[f"ratio_marker_share_guided_to_plain_{key}"] = max(run["guided"]["marker_share"], 1e-3) / max(
            run["plain"]["marker_share"], 1e-3
        )
        result[f"accuracy_change_points_{key}"] = 100 * (run["guided"]["accuracy"] - run["plain"]["accuracy"])
    _write_table(result, "saliency_shortcut", ("accuracy", "marker_share", "kl"))
    return result


@benchmark
def saliency_step(quick: bool) -> dict[str, Any]:
    """One SupervisedTrainer iteration with SaliencyGuidance (the brain bundle's guidance: saliency_train.yaml's
    method, layers and divergence, create_graph) against the same iteration without it, on a 3D batch of the bundle's
    student (target ≤ 2.5×), and the same for the other saliency losses."""
    import torch
    from monai.engines import SupervisedTrainer

    from monai_kdx.handlers import SaliencyGuidance
    from monai_kdx.losses import GAINLoss, RightForTheRightReasonsLoss, SaliencyAlignmentLoss
    from monai_kdx.networks import build_network

    student_def, guidance, default = _student_and_guidance("brain_mri_3d")
    size, batch, repeats = (32, 2, 3) if quick else (64, 8, 7)
    generator = torch.Generator().manual_seed(0)
    data = {
        "image": torch.randn(batch, 1, size, size, size, generator=generator),
        "label": torch.arange(batch) % 4,
        "gaze": torch.rand(batch, 1, size, size, size, generator=generator),
    }
    losses = {
        "plain": None,
        "default": default,
        "input_gradient": SaliencyAlignmentLoss(method="input_gradient", divergence="cc"),
        "rrr": RightForTheRightReasonsLoss(),
        "gain": GAINLoss(GAIN_LAYER),
    }
    seconds = {}
    for name, loss in losses.items():
        torch.manual_seed(0)
        network = build_network(student_def)
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
        seconds[name] = median_seconds(lambda trainer=trainer: _fire_iteration(trainer, data), repeats)
    return {
        "input": [batch, 1, size, size, size],
        "student_def": student_def,
        "guidance": guidance,
        "seconds": seconds,
        **{f"ratio_{name}_to_plain_step": seconds[name] / seconds["plain"] for name in losses if name != "plain"},
        "target": "ratio_default_to_plain_step <= 2.5",
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
    lines = [f"| bundle | training | {' | '.join(columns)} |", "|---" * (len(columns) + 2) + "|"]
    for kind, run in result["runs"].items():
        for arm in ("plain", "guided"):
            values = " | ".join(f"{run[arm][c]:.3f}" for c in columns)
            lines.append(f"| {kind} ({run['test_samples']} test) | {arm} | {values} |")
    (results_dir() / f"{name}.md").write_text("\n".join(lines) + "\n")
