"""Relevance pruning benchmarks: inference latency of pruned networks, and accuracy against the fraction of
channels removed for each relevance method after the same fine-tuning budget.

    python benchmarks/run.py pruning_latency [--quick]
    python benchmarks/run.py pruning_accuracy [--quick]     # also writes pruning_accuracy.md / .png

Both run with one torch thread: the machines are shared, and OpenMP threads waiting on busy cores make
multi-threaded CPU timings of small 3D convolutions meaningless (ratios are measured in the same run anyway).
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

from common import benchmark, one_torch_thread, results_dir, teacher_and_student

METHODS = ["lrp", "ig", "taylor", "magnitude", "random"]  # ig: integrated gradients; taylor: gradient × activation


@benchmark
def pruning_latency(quick: bool) -> dict[str, Any]:
    """CPU inference latency (batch 1, eval, no grad) of the brain_mri_3d bundle's teacher and student pruned by 50%
    of their channels (LRP relevance on random calibration volumes: the structure, not the choice of channels, sets
    the cost) against the unpruned networks, on 1×1×96³ and 1×1×64³ inputs: the median ratio of the two timed in turn
    (:func:`monai_kdx.networks.latency_ratio`). Target: ≤ 0.5×."""
    import torch

    from monai_kdx.networks import count_macs, count_parameters, latency_ms, latency_ratio
    from monai_kdx.pruning import prune_by_relevance

    with one_torch_thread():
        sizes, repeats, rounds = ((32,), 2, 1) if quick else ((96, 64), 3, 9)
        calibration = [{"image": torch.randn(2, 1, 32, 32, 32), "label": torch.tensor([0, 1])}]
        rows: dict[str, Any] = {}
        result: dict[str, Any] = {
            "sizes": list(sizes), "repeats": repeats, "rounds": rounds, "ratio_removed": 0.5, "torch_threads": 1
        }  # fmt: skip
        teacher, student = teacher_and_student()
        for name, network in {"densenet121_teacher": teacher, "shallowcnn_student": student}.items():
            network.eval()
            pruned = prune_by_relevance(network, calibration, 0.5, method="lrp").eval()
            row: dict[str, Any] = {
                "params": count_parameters(network),
                "params_pruned": count_parameters(pruned),
            }
            for size in sizes:
                image = torch.randn(1, 1, size, size, size)
                macs, macs_pruned = count_macs(network, (1,) + (size,) * 3), count_macs(pruned, (1,) + (size,) * 3)
                row[f"{size}"] = {
                    "unpruned_ms": latency_ms(network, image, repeats),
                    "pruned_ms": latency_ms(pruned, image, repeats),
                    "macs": macs,
                    "macs_pruned": macs_pruned,
                }
                result[f"ratio_latency_{name}_{size}"] = latency_ratio(pruned, network, image, rounds, repeats)
                result[f"ratio_macs_{name}_{size}"] = macs_pruned / macs
            result[f"ratio_params_{name}"] = row["params_pruned"] / row["params"]
            rows[name] = row
        result["rows"] = rows
        result["targets"] = {"ratio_latency_*": "<= 0.5 at 50% of the channels removed"}
        return result


# ----------------------------------------------------------------------------------------------------------------------
# accuracy vs fraction of channels removed
# ----------------------------------------------------------------------------------------------------------------------
FULL = {
    "n": 500,
    "split_fractions": [0.5, 0.1, 0.4],
    "spatial_size": 32,
    "base_epochs": 40,
    "finetune_epochs": 4,
    "finetune_seeds": 3,
    "batch_size": 8,
    "ratios": [0.1, 0.3, 0.5, 0.7],
    "calibration_batches": 6,
    "lr": 1e-3,
    "finetune_lr": 5e-4,
}
QUICK = {**FULL, "n": 16, "split_fractions": [0.6, 0.2, 0.2], "base_epochs": 1, "finetune_epochs": 1,
         "finetune_seeds": 1, "batch_size": 4, "ratios": [0.5], "calibration_batches": 1}  # fmt: skip


def _splits(settings: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    import torch

    from monai_kdx.data import generate_dataset

    samples = generate_dataset(
        "brain-mri-3d",
        n=settings["n"],
        seed=0,
        split_fractions=tuple(settings["split_fractions"]),
        spatial_size=settings["spatial_size"],
    )
    splits: dict[str, list[dict[str, Any]]] = {"training": [], "validation": [], "test": []}
    for sample in samples:
        image = torch.as_tensor(sample.image, dtype=torch.float32)[None]
        image = (image - image.mean()) / image.std().clamp_min(1e-6)  # NormalizeIntensityd, as in the bundle
        splits[sample.split].append({"image": image, "label": sample.label})
    return splits


def _batches(items: list[dict[str, Any]], batch_size: int, shuffle_seed: int | None = None) -> list[dict[str, Any]]:
    import torch

    order = list(range(len(items)))
    if shuffle_seed is not None:
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(shuffle_seed)).tolist()
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = [items[i] for i in order[start : start + batch_size]]
        batches.append(
            {"image": torch.stack([c["image"] for c in chunk]), "label": torch.tensor([c["label"] for c in chunk])}
        )
    return batches


def _train(network: Any, items: list[dict[str, Any]], epochs: int, lr: float, batch_size: int, seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(network.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)  # as the bundles
    loss_fn = torch.nn.CrossEntropyLoss()
    network.train()
    for epoch in range(epochs):
        for batch in _batches(items, batch_size, shuffle_seed=seed * 1000 + epoch):
            optimizer.zero_grad()
            loss_fn(network(batch["image"]), batch["label"]).backward()
            optimizer.step()
        schedule.step()
    network.eval()


def _finetuned(network: Any, settings: dict[str, Any], splits: dict[str, Any], test: list[Any]) -> list[float]:
    """Test accuracy after the same fine-tuning budget, once per fine-tuning seed (a fresh copy each time)."""
    accuracies = []
    for seed in range(1, settings["finetune_seeds"] + 1):
        copy_ = copy.deepcopy(network)
        _train(copy_, splits["training"], settings["finetune_epochs"], settings["finetune_lr"], settings["batch_size"],
               seed=seed)  # fmt: skip
        accuracies.append(_accuracy(copy_, test))
    return accuracies


def _accuracy(network: Any, batches: list[dict[str, Any]]) -> float:
    import torch

    network.eval()
    with torch.no_grad():
        correct = sum(int((network(b["image"]).argmax(1) == b["label"]).sum()) for b in batches)
    return correct / sum(len(b["label"]) for b in batches)


@benchmark
def pruning_accuracy(quick: bool) -> dict[str, Any]:
    """Test accuracy of the brain_mri_3d ShallowCNN student against the fraction of channels removed, for LRP,
    integrated gradients, Taylor (gradient × activation), magnitude and random importance: one trained base network,
    pruned per layer by each method and ratio (relevance on training batches), then fine-tuned with the same budget
    (same epochs, cosine learning-rate schedule and batch order), three fine-tuning seeds (mean ± std). The unpruned
    network fine-tuned with the same budget is the reference. Accuracy right after pruning is reported too."""
    import torch

    from monai_kdx.networks import ShallowCNN, count_macs, count_parameters
    from monai_kdx.pruning import collect_relevance, prune_by_relevance

    with one_torch_thread():
        settings = dict(QUICK if quick else FULL)
        start = time.perf_counter()
        splits = _splits(settings)
        generation_s = time.perf_counter() - start
        bs = settings["batch_size"]
        test = _batches(splits["test"], bs)
        calibration = _batches(splits["training"], bs, shuffle_seed=123)[: settings["calibration_batches"]]
        torch.manual_seed(0)
        base = ShallowCNN(3, 1, 4)
        _train(base, splits["training"], settings["base_epochs"], settings["lr"], bs, seed=0)
        base_accuracy = _accuracy(base, test)
        shape = (1,) + (settings["spatial_size"],) * 3
        rows = []
        relevance_s = {}
        for method in METHODS:
            started = time.perf_counter()  # relevance of the base network: computed once, shared by every ratio
            relevance = collect_relevance(base, calibration, method)
            relevance_s[method] = time.perf_counter() - started
            for ratio in settings["ratios"]:
                pruned = prune_by_relevance(copy.deepcopy(base), calibration, ratio, relevance=relevance)
                seeds = _finetuned(pruned, settings, splits, test)
                rows.append(
                    {
                        "method": method,
                        "ratio": ratio,
                        "accuracy_pruned": _accuracy(pruned, test),
                        "accuracy_finetuned": statistics.mean(seeds),
                        "accuracy_finetuned_std": statistics.pstdev(seeds),
                        "accuracy_finetuned_seeds": seeds,
                        "params": count_parameters(pruned),
                        "macs": count_macs(pruned, shape),
                    }
                )
        # the unpruned network fine-tuned with the same budget: the reference each pruned row is compared against
        reference_seeds = _finetuned(base, settings, splits, test)
        reference_accuracy = statistics.mean(reference_seeds)
        total_s = time.perf_counter() - start

    def acc(method: str, ratio: float, key: str = "accuracy_finetuned") -> float:
        return next(r[key] for r in rows if r["method"] == method and r["ratio"] == ratio)

    mid = 0.5 if 0.5 in settings["ratios"] else settings["ratios"][0]
    result: dict[str, Any] = {
        "settings": {
            **settings,
            "network": "ShallowCNN(3, 1, 4)",
            "methods": METHODS,
            "torch_threads": 1,
            "test_samples": len(splits["test"]),
            "training_samples": len(splits["training"]),
            "pruning": "per layer (each layer loses the ratio), relevance target: label",
        },  # fmt: skip
        "base_accuracy": base_accuracy,
        "reference_accuracy_finetuned": reference_accuracy,
        "reference_accuracy_finetuned_seeds": reference_seeds,
        "base_params": count_parameters(base),
        "base_macs": count_macs(base, shape),
        "rows": rows,
        "relevance_s": relevance_s,
        "generation_s": generation_s,
        "total_s": total_s,
    }
    for method in METHODS:
        result[f"ratio_accuracy_drop_{method}_at_{mid}"] = reference_accuracy - acc(method, mid)
    for method in ("lrp", "ig", "taylor"):
        result[f"ratio_{method}_minus_magnitude_at_{mid}"] = acc(method, mid) - acc("magnitude", mid)
    result["targets"] = {
        "ratio_accuracy_drop_*_at_0.5": "<= 0.01 (one point) for relevance methods",
        "ratio_<relevance>_minus_magnitude_at_0.5": ">= 0",
    }
    _report(result, quick)
    return result


def _report(result: dict[str, Any], quick: bool) -> None:
    """Markdown table and PNG plot next to the JSON (``pruning_accuracy.md`` / ``.png``)."""
    ratios = result["settings"]["ratios"]
    lines = [
        "# Relevance pruning: test accuracy vs fraction of channels removed" + (" (quick run)" if quick else ""),
        "",
        f"ShallowCNN student on brain-mri-3d at {result['settings']['spatial_size']}³, "
        f"{result['settings']['test_samples']} test volumes; base accuracy {result['base_accuracy']:.3f}, "
        f"unpruned with the same fine-tuning {result['reference_accuracy_finetuned']:.3f}. "
        f"Each cell: mean ± std over {result['settings']['finetune_seeds']} fine-tuning seeds after "
        f"{result['settings']['finetune_epochs']} fine-tuning epochs (in brackets: right after pruning, before "
        "fine-tuning; 0.25 is chance).",
        "",
        "| method | " + " | ".join(f"{r:.0%} removed" for r in ratios) + " |",
        "|---|" + "---|" * len(ratios),
    ]
    for method in METHODS:
        cells = []
        for ratio in ratios:
            row = next(r for r in result["rows"] if r["method"] == method and r["ratio"] == ratio)
            cells.append(
                f"{row['accuracy_finetuned']:.3f} ± {row['accuracy_finetuned_std']:.3f} ({row['accuracy_pruned']:.3f})"
            )
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    macs = [next(r["macs"] for r in result["rows"] if r["method"] == "magnitude" and r["ratio"] == x) for x in ratios]
    lines += ["| MACs / unpruned | " + " | ".join(f"{m / result['base_macs']:.2f}" for m in macs) + " |", ""]
    folder = results_dir()
    (folder / "pruning_accuracy.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for method in METHODS:
        rows = [next(r for r in result["rows"] if r["method"] == method and r["ratio"] == x) for x in ratios]
        axis.errorbar(
            ratios,
            [r["accuracy_finetuned"] for r in rows],
            yerr=[r["accuracy_finetuned_std"] for r in rows],
            marker="o",
            capsize=3,
            label=method,
        )
    axis.axhline(result["reference_accuracy_finetuned"], color="gray", linestyle="--", label="unpruned")
    axis.set_xlabel("fraction of channels removed")
    axis.set_ylabel("test accuracy after fine-tuning")
    axis.set_title("brain-mri-3d, ShallowCNN")
    axis.legend()
    figure.tight_layout()
    figure.savefig(folder / "pruning_accuracy.png", dpi=120)
    plt.close(figure)
