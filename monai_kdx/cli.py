"""The monai-kdx command line.

- ``monai-kdx make-dataset --kind brain-mri-3d --out DIR --n N --seed S``: write a semi-synthetic
  lesion dataset (NIfTI files + MONAI datalist JSON) with masks and simulated gaze.
- ``monai-kdx demo [--quick] [--out runs/demo]``: the main job.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="monai-kdx", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    make = commands.add_parser("make-dataset", help="write a semi-synthetic lesion dataset with ground truth")
    make.add_argument("--kind", default="brain-mri-3d", help="dataset kind (brain-mri-3d, chest-xray-2d, retina-2d)")
    make.add_argument("--out", required=True, help="output folder (created; must be empty or hold the same dataset)")
    make.add_argument("--n", type=int, default=240, help="number of samples over all splits")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--spatial-size", type=int, default=None, help="side length in voxels/pixels")
    make.add_argument("--shortcut-p", type=float, default=None, help="probability of a label-correlated marker")

    demo = commands.add_parser("demo", help="the main job: data, teacher training and evaluation, in MLflow")
    demo.add_argument("--out", default="runs/demo", help="output folder (data, checkpoints, MLflow store)")
    demo.add_argument("--quick", action="store_true", help="tiny data and one epoch (smoke test)")
    demo.add_argument("--max-epochs", type=int, default=None)
    return parser


def _make_dataset(args: argparse.Namespace) -> int:
    from monai_kdx.data import write_dataset

    knobs = {}
    if args.spatial_size is not None:
        knobs["spatial_size"] = args.spatial_size
    if args.shortcut_p is not None:
        knobs["shortcut_p"] = args.shortcut_p
    datalist = write_dataset(args.out, kind=args.kind, n=args.n, seed=args.seed, progress=True, **knobs)
    print(f"datalist: {datalist}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from monai_kdx.pipeline import run_teacher_demo

    overrides = {} if args.max_epochs is None else {"max_epochs": args.max_epochs}
    train, test = run_teacher_demo(args.out, quick=args.quick, **overrides)
    print()
    print("| stage | metric | value | seconds |")
    print("|---|---|---|---|")
    for stage in (train, test):
        for key, value in stage.metrics.items():
            print(f"| {stage.name} | {key} | {value:.4f} | {stage.seconds:.1f} |")
    print()
    print(f"teacher test accuracy: {test.metrics['test_accuracy']:.4f}")
    print(f"dataset preview: {train.extras['preview']}")
    print(f"MLflow runs: experiment {test.experiment_name!r}, runs {train.run_name!r} and {test.run_name!r}")
    print(f"open them with: mlflow ui --backend-store-uri {test.tracking_uri}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``monai-kdx`` console script."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    args = build_parser().parse_args(argv)
    handlers = {"make-dataset": _make_dataset, "demo": _demo}
    try:
        return handlers[args.command](args)
    except (ValueError, KeyError, OSError) as error:  # bad input: a clear message, no traceback
        print(f"monai-kdx {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
