"""Benchmark runner: each benchmark writes one JSON file to ``benchmarks/results/`` and prints a line.

Machines here are shared and noisy, so every benchmark reports ratios measured in the same run
(against a baseline measured alongside), with the absolute numbers for context.

Usage:
    python benchmarks/run.py                   # all benchmarks
    python benchmarks/run.py import_time       # one
    python benchmarks/run.py --quick           # small sizes (smoke run, used by the tests)
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

RESULTS = Path(__file__).resolve().parent / "results"
BENCHMARKS: dict[str, Callable[[bool], dict[str, Any]]] = {}


def benchmark(func: Callable[[bool], dict[str, Any]]) -> Callable[[bool], dict[str, Any]]:
    BENCHMARKS[func.__name__] = func
    return func


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
        "ratio_networks_to_torch": seconds["monai_kdx.networks"] / seconds["torch"],
        "ratio_data_to_monai": seconds["monai_kdx.data"] / seconds["monai"],
    }


@benchmark
def teacher_throughput(quick: bool) -> dict[str, Any]:
    """Teacher training throughput (volumes/s) on the 3D brain MRI dataset, with the inference rate
    measured in the same run as the baseline for the ratio."""
    import torch
    from monai.networks.nets import DenseNet121

    from monai_kdx.data import generate_dataset

    size, batch, steps = (32, 4, 3) if quick else (64, 8, 10)
    samples = generate_dataset("brain-mri-3d", n=batch * 2, seed=0, spatial_size=size)
    images = torch.stack([torch.as_tensor(s.image)[None] for s in samples[:batch]]).float()
    labels = torch.tensor([s.label for s in samples[:batch]])
    torch.manual_seed(0)
    network = DenseNet121(spatial_dims=3, in_channels=1, out_channels=4, init_features=16, growth_rate=8)
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


def main(argv: list[str] | None = None) -> int:
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
