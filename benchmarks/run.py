"""Benchmark runner: each benchmark writes one JSON file to ``benchmarks/results/`` and prints a line.

Machines here are shared and noisy, so every benchmark reports ratios measured in the same run
(against a baseline measured alongside), with the absolute numbers for context.

Usage:
    python benchmarks/run.py                   # all benchmarks
    python benchmarks/run.py import_time       # one
    python benchmarks/run.py --quick           # small sizes (smoke run, used by the tests)

Shared-core benchmarks and distillation live here; each other capability has its own module
``benchmarks/bench_<capability>.py`` whose ``@benchmark`` functions register on import.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from common import (
    BENCHMARKS,
    RESULTS,
    benchmark,
    load_capability_benchmarks,
    one_torch_thread,
    set_results_dir,
    teacher_and_student,
)

from monai_kdx.networks import median_seconds


def _import_seconds(module: str, repeats: int) -> float:
    """Median wall time of ``import module`` in a fresh interpreter (interpreter start excluded)."""
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    times = [float(subprocess.check_output([sys.executable, "-c", code], text=True)) for _ in range(repeats)]
    return statistics.median(times)


@benchmark
def import_time(quick: bool) -> dict[str, Any]:
    """``import monai_kdx`` (and its shared core) against ``import torch`` and ``import monai``."""
    repeats = 3 if quick else 7
    seconds = {
        m: _import_seconds(m, repeats) for m in ("torch", "monai", "monai_kdx", "monai_kdx.networks", "monai_kdx.data")
    }
    return {
        "seconds": seconds,
        "ratio_monai_kdx_to_torch": seconds["monai_kdx"] / seconds["torch"],
        "ratio_networks_to_monai": seconds["monai_kdx.networks"] / seconds["monai"],
        "ratio_data_to_monai": seconds["monai_kdx.data"] / seconds["monai"],
    }


@benchmark
def teacher_throughput(quick: bool) -> dict[str, Any]:
    """Teacher training throughput (volumes/s) on the 3D brain MRI dataset, with the inference rate
    measured in the same run as the baseline for the ratio."""
    import torch

    from monai_kdx.data import generate_dataset

    size, batch, steps = (32, 4, 3) if quick else (64, 8, 10)
    samples = generate_dataset("brain-mri-3d", n=batch * 2, seed=0, spatial_size=size)
    images = torch.stack([torch.as_tensor(s.image)[None] for s in samples[:batch]]).float()
    labels = torch.tensor([s.label for s in samples[:batch]])
    network, _ = teacher_and_student()
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
    loss_function = torch.nn.CrossEntropyLoss()

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_function(network(images), labels).backward()
        optimizer.step()

    def infer_step() -> None:
        with torch.no_grad():
            network(images)

    def rate(step: Callable[[], None]) -> float:
        step()  # warm-up
        start = time.perf_counter()
        for _ in range(steps):
            step()
        return batch * steps / (time.perf_counter() - start)

    network.train()
    train_rate = rate(train_step)
    network.eval()
    infer_rate = rate(infer_step)
    return {
        "spatial_size": size,
        "batch_size": batch,
        "threads": torch.get_num_threads(),
        "network": "DenseNet121(init_features=16, growth_rate=8), 3D",
        "params": sum(p.numel() for p in network.parameters()),
        "train_volumes_per_s": train_rate,
        "inference_volumes_per_s": infer_rate,
        "ratio_train_step_to_inference": infer_rate / train_rate,
    }


@benchmark
def distillation_step(quick: bool) -> dict[str, Any]:
    """Cost of one DistillationTrainer iteration (KD + attention transfer, as in distill.yaml) against
    its floor: a plain student training step plus a teacher forward without autograd, same run."""
    import torch
    from ignite.engine import Events

    from monai_kdx.engines import DistillationTrainer
    from monai_kdx.losses import AttentionTransferLoss, DistillationLoss, KnowledgeDistillationLoss

    size, batch, repeats = (32, 2, 3) if quick else (64, 8, 7)
    teacher, student = teacher_and_student()
    images = torch.randn(batch, 1, size, size, size)
    labels = torch.randint(0, 4, (batch,))
    loss = DistillationLoss(
        {
            "logits": KnowledgeDistillationLoss(4.0, 0.7),
            "attention": AttentionTransferLoss(
                ["blocks.1", "blocks.2", "blocks.3"],
                ["features.denseblock1", "features.denseblock2", "features.denseblock3"],
                beta=1.0,
            ),
        }
    )
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-4)
    trainer = DistillationTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=[{"image": images, "label": labels}] * (repeats + 1),
        network=student,
        teacher_network=teacher,
        loss_function=loss,
        optimizer=optimizer,
    )

    def floor_step() -> None:
        with torch.no_grad():
            teacher(images)
        student.train()
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(student(images), labels).backward()
        optimizer.step()

    floor, distill, started = [], [], []
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda _: started.append(time.perf_counter()))

    def after_iteration(_: Any) -> None:  # time the real iteration, then a floor step right after it
        distill.append(time.perf_counter() - started[-1])
        start = time.perf_counter()
        floor_step()
        floor.append(time.perf_counter() - start)

    trainer.add_event_handler(Events.ITERATION_COMPLETED, after_iteration)
    trainer.run()
    floor, distill = floor[1:], distill[1:]  # drop the warm-up iteration
    return {
        "spatial_size": size,
        "batch_size": batch,
        "floor_step_s": statistics.median(floor),
        "distillation_step_s": statistics.median(distill),
        "ratio_distillation_to_student_step_plus_teacher_forward": statistics.median(distill)
        / statistics.median(floor),
        "target": "<= 1.15",
    }


def _explanation_seconds(network: Any, image: Any, repeats: int) -> dict[str, float]:
    """Median seconds of the two hierarchical explanations of ``image`` on one torch thread:

    - ``activation_maps``: the distillation research idea's, the channel-mean map of every convolution from one
      forward pass, each resized to the input (:func:`~monai_kdx.explain.hierarchical_activation_maps`);
    - ``gradcam_per_stage``: Grad-CAM at one layer per resolution stage, fused, from one forward and one
      backward pass (:class:`~monai_kdx.explain.HierarchicalCAM`).
    """
    from monai_kdx.explain import HierarchicalCAM, hierarchical_activation_maps

    explainer = HierarchicalCAM(network)
    calls = {
        "activation_maps": lambda: hierarchical_activation_maps(network, image),
        "gradcam_per_stage": lambda: explainer.cam(image),
    }
    with one_torch_thread():
        return {name: median_seconds(call, repeats) for name, call in calls.items()}


def _explanation_ratios(teacher: dict[str, float], student: dict[str, float]) -> dict[str, float]:
    """Teacher-to-student ratios of :func:`_explanation_seconds`; the activation maps' is the target's."""
    return {
        "ratio_teacher_to_student_explanation_time": teacher["activation_maps"] / student["activation_maps"],
        "ratio_teacher_to_student_gradcam_time": teacher["gradcam_per_stage"] / student["gradcam_per_stage"],
    }


@benchmark
def explanation_time(quick: bool) -> dict[str, Any]:
    """The two hierarchical explanations (see ``_explanation_seconds``) of the 3D teacher against the shallow
    student, same run, one torch thread."""
    import torch

    from monai_kdx.explain import conv_layer_paths, stage_layers

    size, repeats = (32, 3) if quick else (64, 7)
    teacher, student = teacher_and_student()
    image = torch.randn(1, 1, size, size, size)
    seconds, levels = {}, {}
    for name, network in (("teacher", teacher.eval()), ("student", student.eval())):
        seconds[name] = _explanation_seconds(network, image, repeats)
        levels[name] = {
            "activation_maps": len(conv_layer_paths(network)),
            "gradcam_per_stage": stage_layers(network, image),
        }
    return {
        "spatial_size": size,
        "levels": levels,
        "seconds": seconds,
        **_explanation_ratios(seconds["teacher"], seconds["student"]),
        "target": "explanation (activation maps, the research idea's) >= 2",
    }


CAM_METHODS = ("hierarchical_cam", "monai_gradcam_one_layer", "captum_layergradcam_per_layer", "floor")


def _cam_setup(size: int) -> tuple[Any, Any, list[str], Callable[[str], Callable[[], Any]]]:
    """A MONAI DenseNet121 (3D, 1 channel in, 2 classes), a 1×1×size³ input, its four dense blocks,
    and a factory: method name → a call that explains the input with that method."""
    import torch
    import torch.nn.functional as F
    from captum.attr import LayerGradCam
    from monai.networks.nets import DenseNet121
    from monai.visualize import GradCAM

    from monai_kdx.explain import HierarchicalCAM
    from monai_kdx.networks import FeatureCapture

    torch.manual_seed(0)
    network = DenseNet121(spatial_dims=3, in_channels=1, out_channels=2).eval()
    image = torch.randn(1, 1, size, size, size)
    layers = [f"features.denseblock{i}" for i in range(1, 5)]

    def floor() -> Any:  # one forward, one backward to the shallowest level, nothing else
        with torch.enable_grad(), FeatureCapture(network, layers[:1]) as features:
            return torch.autograd.grad(network(image)[:, 1].sum(), features[layers[0]])

    def captum_per_layer() -> Any:
        return [
            F.interpolate(
                LayerGradCam(network, network.get_submodule(path)).attribute(image, target=1, relu_attributions=True),
                size=image.shape[2:],
                mode="trilinear",
            )
            for path in layers
        ]

    ours = HierarchicalCAM(network, layers)
    monai_cam = GradCAM(network, target_layers=layers[-1])
    calls = {
        "hierarchical_cam": lambda: ours.cam(image, 1),
        "monai_gradcam_one_layer": lambda: monai_cam(image, class_idx=1),
        "captum_layergradcam_per_layer": captum_per_layer,
        "floor": floor,
    }
    return network, image, layers, calls.__getitem__


def _cam_peak_memory_mb(method: str, size: int) -> float:
    """Peak resident memory (MiB) of one call of ``method`` above the resident memory just before it
    (network and input already built), in a fresh process; Linux resets the peak through clear_refs."""
    here = str(Path(__file__).resolve().parent)
    code = (
        f"import sys; sys.path.insert(0, {here!r}); import run, torch; torch.set_num_threads(1);"
        f"_, _, _, make = run._cam_setup({size}); call = make({method!r});"
        "kib = lambda key: int([l for l in open('/proc/self/status') if l.startswith(key)][0].split()[1]);"
        "open('/proc/self/clear_refs', 'w').write('5'); before = kib('VmRSS');"
        "call(); print((kib('VmHWM') - before) / 1024)"
    )
    return float(subprocess.check_output([sys.executable, "-c", code], text=True).split()[-1])


@benchmark
def cam_speed(quick: bool) -> dict[str, Any]:
    """All four levels of HierarchicalCAM (features.denseblock1-4) against ONE MONAI ``GradCAM`` call on
    one layer, against captum's ``LayerGradCam`` called once per layer, and against the floor (one
    forward + one backward to the shallowest level), on a 3D DenseNet121 with a 1×1×96³ input."""
    size, repeats = (32, 2) if quick else (96, 3)
    _, _, layers, make = _cam_setup(size)
    seconds = {method: median_seconds(make(method), repeats) for method in CAM_METHODS}
    return {
        "network": "monai DenseNet121(spatial_dims=3, in_channels=1, out_channels=2)",
        "input": [1, 1, size, size, size],
        "levels": layers,
        "seconds": seconds,
        "peak_memory_mib": {method: _cam_peak_memory_mb(method, size) for method in CAM_METHODS},
        "ratio_ours_to_monai_gradcam": seconds["hierarchical_cam"] / seconds["monai_gradcam_one_layer"],
        "speedup_over_captum_per_layer": seconds["captum_layergradcam_per_layer"] / seconds["hierarchical_cam"],
        "ratio_ours_to_floor": seconds["hierarchical_cam"] / seconds["floor"],
        "targets": {"ratio_ours_to_monai_gradcam": "<= 0.8", "speedup_over_captum_per_layer": ">= 2.2"},
    }


# distillation_accuracy's data: the bundle's 168 training and 36 validation volumes' worth, with a test
# split large enough (276 volumes: one is 0.36 points) to tell students apart, and several training seeds
# (the same data; weights, shuffling and augmentation vary) so one lucky initialisation decides nothing.
# The teacher trains four times the bundle's 12 epochs: at 12 it underfits (train accuracy 0.85, test 0.79
# on these 276 volumes), at 48 it fits the training set. The students train twice the bundle's epochs: at 12
# both underfit (train accuracy 0.82-0.94), the KD student more, and KD loses to the student trained alone.
# Every row is tested on its best checkpoint (validation accuracy, what distill.yaml reads from the teacher)
# and on its final one: 36 validation volumes pick noisily.
ACCURACY_DATA = {"n_samples": 480, "split_fractions": [0.35, 0.075, 0.575]}
ACCURACY_SEEDS = (0, 1, 2)
ACCURACY_TEACHER_EPOCHS = 48
ACCURACY_STUDENT_EPOCHS = 24
CHECKPOINT_ROWS = {"test_accuracy_per_seed": "model.pt", "final_test_accuracy_per_seed": "model_final.pt"}


@benchmark
def distillation_accuracy(quick: bool) -> dict[str, Any]:
    """Teacher vs KD student vs the same student trained without a teacher, through the real bundles
    (train_teacher.yaml, distill.yaml, evaluate.yaml) on the 3D brain MRI dataset: test accuracy (students:
    the mean over training seeds, each seed's figure kept), parameters, MACs, CPU inference latency and
    hierarchical explanation time."""
    import tempfile

    import torch

    from monai_kdx.apps.pipeline import QUICK_OVERRIDES, run_bundle
    from monai_kdx.networks import count_macs, count_parameters, load_weights

    settings = dict(QUICK_OVERRIDES) if quick else dict(ACCURACY_DATA)
    seeds = ACCURACY_SEEDS[:1] if quick else ACCURACY_SEEDS
    epochs = (settings["max_epochs"],) * 2 if quick else (ACCURACY_TEACHER_EPOCHS, ACCURACY_STUDENT_EPOCHS)
    teacher_epochs, student_epochs = epochs
    size = settings.get("spatial_size", 64)
    student_def = "@student_def"  # trained by train_teacher.yaml in place of the teacher (the bundle's student)
    image = torch.randn(1, 1, size, size, size)
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as folder:
        settings.update(output_dir=folder, dataset_dir=os.path.join(folder, "data"))
        runs = [("teacher", 0, ["train_teacher.yaml"], {"max_epochs": teacher_epochs})]
        for seed in seeds:
            student = {"max_epochs": student_epochs}
            runs.append(("kd_student", seed, ["train_teacher.yaml", "distill.yaml"], student))
            runs.append(("scratch_student", seed, ["train_teacher.yaml"], {**student, "teacher_def": student_def}))
        for name, seed, configs, extra in runs:
            ckpt_dir = os.path.join(folder, "models") if name == "teacher" else os.path.join(folder, f"{name}_{seed}")
            train = run_bundle(
                "brain_mri_3d",
                configs,
                ["train#trainer"],
                **{**settings, **extra},  # a run's own values (the teacher's epochs) over the shared ones
                ckpt_dir=ckpt_dir,
                train_seed=seed,
                run_name=f"train_{name}_{seed}",
            )
            row = rows.setdefault(name, {key: {} for key in (*CHECKPOINT_ROWS, "train_s_per_seed")})
            for key, filename in CHECKPOINT_ROWS.items():
                test = run_bundle(
                    "brain_mri_3d",
                    ["train_teacher.yaml", "evaluate.yaml"],
                    ["evaluator"],
                    **settings,
                    **({} if name == "teacher" else {"teacher_def": student_def}),
                    ckpt_path=os.path.join(ckpt_dir, filename),
                    run_name=f"evaluate_{name}_{seed}_{filename[:-3]}",
                )
                row[key][seed] = test.metrics["test_accuracy"]
            checkpoint = os.path.join(ckpt_dir, CHECKPOINT_ROWS["test_accuracy_per_seed"])  # the best
            row["train_s_per_seed"][seed] = train.seconds
            if "params" not in row:  # size and speed: the architecture's, timed once on the first checkpoint
                network = teacher_and_student()[0 if name == "teacher" else 1]
                load_weights(network, checkpoint).eval()
                with torch.no_grad(), one_torch_thread():
                    row["inference_s"] = median_seconds(lambda network=network: network(image), 5)
                row["params"] = count_parameters(network)
                row["macs"] = count_macs(network, (1, size, size, size))
                row["explanation_s"] = _explanation_seconds(network, image, 3)
    for row in rows.values():
        accuracies = list(row["test_accuracy_per_seed"].values())
        row["test_accuracy"] = statistics.mean(accuracies)
        row["test_accuracy_min"], row["test_accuracy_max"] = min(accuracies), max(accuracies)
        row["final_test_accuracy"] = statistics.mean(row["final_test_accuracy_per_seed"].values())
    teacher, kd, scratch = rows["teacher"], rows["kd_student"], rows["scratch_student"]
    wins = sum(kd["test_accuracy_per_seed"][s] >= scratch["test_accuracy_per_seed"][s] for s in seeds)
    return {
        "spatial_size": size,
        "data": {key: settings[key] for key in ("n_samples", "split_fractions") if key in settings},
        "seeds": list(seeds),
        "teacher_epochs": teacher_epochs,
        "student_epochs": student_epochs,
        "rows": rows,
        "kd_at_least_scratch_seeds": f"{wins}/{len(seeds)}",
        "ratio_kd_minus_scratch_accuracy": kd["test_accuracy"] - scratch["test_accuracy"],
        "ratio_kd_minus_scratch_final_accuracy": kd["final_test_accuracy"] - scratch["final_test_accuracy"],
        "ratio_teacher_minus_kd_accuracy": teacher["test_accuracy"] - kd["test_accuracy"],
        **_explanation_ratios(teacher["explanation_s"], kd["explanation_s"]),
        "ratio_teacher_to_student_inference_time": teacher["inference_s"] / kd["inference_s"],
        "targets": "KD >= scratch; teacher - KD <= 0.02; explanation (activation maps) ratio >= 2 (accuracies: means"
        " over seeds; times: one torch thread)",
    }


def main(argv: list[str] | None = None) -> int:
    load_capability_benchmarks()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {sorted(BENCHMARKS)})")
    parser.add_argument("--quick", action="store_true", help="small sizes, for smoke runs")
    parser.add_argument("--out", default=str(RESULTS), help="folder for the JSON results")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; available: {sorted(BENCHMARKS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    set_results_dir(out)
    for name in args.names or list(BENCHMARKS):
        result = {
            "benchmark": name,
            "quick": args.quick,
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
            "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **BENCHMARKS[name](args.quick),
        }
        (out / f"{name}.json").write_text(json.dumps(result, indent=2))
        ratios = {k: round(v, 3) for k, v in result.items() if k.startswith("ratio")}
        print(f"{name}: {ratios} -> {out / (name + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
