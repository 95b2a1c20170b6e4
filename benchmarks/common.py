"""What every benchmark module shares: the registry of benchmarks, the results folder, one torch thread (the timer
is :func:`monai_kdx.networks.median_seconds`)."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BENCHMARKS: dict[str, Callable[[bool], dict[str, Any]]] = {}
_results = {"dir": RESULTS}


def set_results_dir(path: Path) -> None:
    """Where this run writes (``run.py --out``): the JSON results and any report, table or plot."""
    _results["dir"] = Path(path)


def results_dir() -> Path:
    """The folder of this run's results (created): benchmarks write their markdown tables and PNGs here."""
    _results["dir"].mkdir(parents=True, exist_ok=True)
    return _results["dir"]


def benchmark(func: Callable[[bool], dict[str, Any]]) -> Callable[[bool], dict[str, Any]]:
    """Register ``func(quick) -> dict`` under its name; its dict is written as JSON (keys ``ratio*`` printed)."""
    BENCHMARKS[func.__name__] = func
    return func


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """One torch thread inside the block, restored after: on a shared 2-core machine, OpenMP threads waiting
    on a busy core make small convolutions many times slower, so timings would measure the neighbours."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def teacher_and_student(bundle: str = "brain_mri_3d") -> tuple[Any, Any]:
    """The bundle's networks (its ``teacher_def`` and ``student_def``), freshly built with seed 0."""
    import torch

    from monai_kdx.apps.pipeline import bundle_parser
    from monai_kdx.networks import build_network

    torch.manual_seed(0)
    parser = bundle_parser(bundle, ["train_teacher.yaml"])
    return tuple(build_network(parser.get_parsed_content(key)) for key in ("teacher_def", "student_def"))


def load_capability_benchmarks() -> None:
    """Import every ``benchmarks/bench_*.py`` module (their ``@benchmark`` functions register themselves)."""
    for module in sorted(HERE.glob("bench_*.py")):
        importlib.import_module(module.stem)
