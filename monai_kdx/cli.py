"""The monai-kdx command line.

- ``monai-kdx make-dataset --kind brain-mri-3d --out DIR --n N --seed S``: write a semi-synthetic
  lesion dataset (NIfTI files + MONAI datalist JSON) with masks and simulated gaze.
- ``monai-kdx demo [--quick] [--out runs/demo] [--until STAGE] [--restart]``: the main job (resumable) on a
  generated dataset.
- ``monai-kdx run --datalist FILE [--out runs/main] [...]``: the same main job on your own datalist.
- ``monai-kdx compare-explanations [--quick] [--out DIR] [--kind KIND ...] [--methods a,b]``: every
  explanation method scored for localization, faithfulness, the randomization sanity check and time per
  image on 2D and 3D data; writes ``report.md``, ``report.png`` and ``report.json``.
- ``monai-kdx bundle list`` / ``monai-kdx bundle export NAME DIR``: the MONAI bundles shipped in the package; copy
  one out as a plain bundle folder to edit and run with ``python -m monai.bundle run``.
- ``monai-kdx bundle run NAME CONFIG... --out DIR [--set KEY=VALUE ...] [--verbose]``: run packaged configs with the
  main job's console (stage lines, a training bar, logs in ``DIR/logs``, one-line errors).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
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

    demo = commands.add_parser(
        "demo",
        help="the main job on a generated dataset: teacher, distilled student, pruned student, saliency-guided "
        "student, explanations, summary report, all in MLflow (resumes an interrupted run)",
    )
    demo.add_argument("--bundle", default="brain_mri_3d", help="brain_mri_3d (default) or chest_xray_2d")
    run = commands.add_parser(
        "run",
        help="the main job on your own datalist (NIfTI images with labels and lesion masks; gaze heatmaps optional)",
    )
    run.add_argument("--datalist", required=True, help="MONAI datalist JSON with training/validation/test sections")
    run.add_argument("--bundle", default=None, help="the bundle whose configs run (default: by the data's 2D/3D)")
    for job in (demo, run):
        job.add_argument("--out", default="runs/demo" if job is demo else "runs/main", help="output folder (data, "
                         "checkpoints, report, MLflow store)")  # fmt: skip
        job.add_argument("--quick", action="store_true", help="one epoch per stage (smoke test; demo: tiny data)")
        job.add_argument("--max-epochs", type=int, default=None, help="epoch cap of every training stage")
        job.add_argument(
            "--spatial-size",
            type=int,
            default=None,
            help="side length in voxels/pixels: of the generated images (demo); every image, mask and gaze map "
            "resampled to it (run; needed when the images differ in shape)",
        )
        job.add_argument("--tracking-uri", default=None, help="MLflow URI (default: sqlite:///OUT/mlruns.db)")
        job.add_argument("--experiment", default=None, help="MLflow experiment (default: the bundle's name)")
        stages = ["teacher", "distill", "prune", "saliency", "explain"]
        job.add_argument("--until", default=None, choices=stages, help="stop after it")
        job.add_argument("--restart", action="store_true", help="start over instead of resuming a run in --out")
        job.add_argument(
            "--verbose",
            action="store_true",
            help="MONAI/ignite logs and library warnings on the console too (default: in OUT/logs/<stage>.log)",
        )
        job.add_argument(
            "--time-budget",
            type=float,
            default=None,
            help="seconds for the whole job: the explain stage's estimated time kept aside, the rest shared among "
            "the training stages (default: 540, so the demo ends within 10 minutes on 2 CPU cores; none with --quick)",
        )

    compare = commands.add_parser(
        "compare-explanations",
        help="score every explanation method (localization, faithfulness, sanity check, time) on 2D and 3D data",
    )
    compare.add_argument("--out", default="runs/compare-explanations", help="folder for report.md/.png/.json")
    compare.add_argument(
        "--kind",
        action="append",
        default=None,
        help="dataset kind, repeatable (default: chest-xray-2d and brain-mri-3d)",
    )
    compare.add_argument("--methods", default=None, help="comma-separated explainer names (default: all registered)")
    compare.add_argument(
        "--checkpoint",
        action="append",
        default=None,
        help="KIND=PATH (or PATH with a single --kind): explain this train_teacher.yaml checkpoint instead of "
        "training the teacher briefly",
    )
    compare.add_argument(
        "--quick", action="store_true", help="a small student, tiny data, one epoch, two images (smoke test)"
    )
    compare.add_argument("--n-images", type=int, default=None, help="test images with a lesion to explain")
    compare.add_argument("--spatial-size", type=int, default=None, help="side length in pixels/voxels")
    compare.add_argument("--seed", type=int, default=0)
    compare.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    compare.add_argument(
        "--tracking-uri",
        default=None,
        help="also log the report (tables, plot, JSON) and per-method scores to a run of experiment "
        "'compare_explanations' in this MLflow store (checked before any work)",
    )

    bundle = commands.add_parser("bundle", help="the MONAI bundles shipped in the package: list them, copy one out")
    bundle_commands = bundle.add_subparsers(dest="bundle_command", required=True)
    bundle_commands.add_parser("list", help="the packaged bundles and their tasks")
    export = bundle_commands.add_parser(
        "export",
        help="copy a packaged bundle out as a plain MONAI bundle folder (configs/, docs/) to edit and run with "
        "python -m monai.bundle run",
    )
    export.add_argument("name", help="bundle name (see: monai-kdx bundle list)")
    export.add_argument("dir", help="the new bundle folder (must not exist, or be empty)")
    run_one = bundle_commands.add_parser(
        "run",
        help="run packaged bundle configs (as python -m monai.bundle run) with the main job's console: one line as it "
        "starts and ends, a progress bar while it trains, MONAI's logs in OUT/logs/<name>.log",
    )
    run_one.add_argument("name", help="bundle name (see: monai-kdx bundle list)")
    run_one.add_argument("configs", nargs="+", help="config files of the bundle, laid on each other in order")
    run_one.add_argument("--out", required=True, help="output folder (checkpoints, data, MLflow store, logs)")
    run_one.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="a config override, repeatable (VALUE read as YAML, e.g. --set max_epochs=3)",
    )  # fmt: skip
    run_one.add_argument("--verbose", action="store_true", help="MONAI's logs on the console too")
    return parser


def _bundle(args: argparse.Namespace) -> int:
    import json

    from monai_kdx.apps.pipeline import BUNDLES_DIR, available_bundles, bundle_path, export_bundle

    if args.bundle_command == "run":
        return _bundle_run(args)
    if args.bundle_command == "list":
        for name in available_bundles():
            meta = json.loads((bundle_path(name) / "configs" / "metadata.json").read_text())
            print(f"{name}\t{meta.get('task', '')}")
        return 0
    folder = export_bundle(args.name, args.dir)
    config = folder / "configs" / "train_teacher.yaml"
    print(f"bundle {args.name!r} exported to {folder}")
    print(f"run it with: python -m monai.bundle run --config_file {config} --bundle_root {folder}")
    print(
        f"check its metadata with: python -m monai.bundle verify_metadata --meta_file {folder / 'configs'}"
        f"/metadata.json --filepath {BUNDLES_DIR / 'meta_schema.json'}"
    )
    return 0


def _bundle_run(args: argparse.Namespace) -> int:
    """``monai-kdx bundle run``: a packaged bundle's configs through :func:`run_bundle`, with a :class:`Console`."""
    import yaml

    from monai_kdx.apps.console import Console, key_metrics
    from monai_kdx.apps.pipeline import bundle_path, run_bundle

    root = bundle_path(args.name)  # an unknown bundle fails here, listing the available ones
    for config in args.configs:
        if not (root / "configs" / config).is_file():
            raise FileNotFoundError(f"bundle {args.name!r} has no config {config!r}; see {root / 'configs'}.")
    out = os.path.abspath(args.out)
    overrides = {"output_dir": out, "dataset_dir": os.path.join(out, "data")}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: write KEY=VALUE.")
        overrides[key] = yaml.safe_load(value)
    training = not {"evaluate.yaml", "explain.yaml"} & set(args.configs)  # else the configs run an evaluator
    engines = ["train#trainer", "validate#evaluator"] if training else ["evaluator"]
    name = os.path.splitext(args.configs[-1])[0]
    console = Console(os.path.join(args.out, "logs"), verbose=args.verbose)
    if not args.verbose:
        _quiet_environment()
    console.line(f"{args.name} {' + '.join(args.configs)}: running (log: {console.shown_path(name)})")
    try:
        with console.capture(name):
            result = run_bundle(
                args.name, list(args.configs), engines,
                on_initialized=console.training_progress(name) if training else None, **overrides,
            )  # fmt: skip
    except Exception as error:
        return _failed("bundle run", error, console.failed_log)
    shown = key_metrics(result.metrics, None, [key for key in result.metrics if key.endswith("accuracy")])
    console.line(f"{name}: done in {result.seconds:.0f} s" + (f" · {shown}" if shown else ""))
    console.line(f"MLflow: {result.tracking_uri}, experiment {result.experiment_name!r}, run {result.run_name!r}")
    return 0


def _quiet_environment() -> None:
    """Notices about the environment, not the data, stay off the console."""
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # database set-up
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)  # no GPU DICOM decoder
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")


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
    from monai_kdx.apps.pipeline import Pipeline, summary_markdown

    overrides = {} if args.max_epochs is None else {"max_epochs": args.max_epochs}
    for name, value, least in (("--max-epochs", args.max_epochs, 1), ("--spatial-size", args.spatial_size, 8)):
        if value is not None and value < least:
            raise ValueError(f"{name} must be >= {least}, got {value}.")
    if args.spatial_size is not None:
        overrides["spatial_size"] = args.spatial_size
        if args.command == "run":
            overrides["resize_to"] = args.spatial_size
    if not args.verbose:
        _quiet_environment()
    pipeline = Pipeline(
        args.out,
        bundle=args.bundle,
        datalist=getattr(args, "datalist", None),
        quick=args.quick,
        tracking_uri=args.tracking_uri,
        experiment_name=args.experiment,
        restart=args.restart,
        verbose=args.verbose,
        **({"time_budget": args.time_budget} if args.time_budget is not None else {}),
        **overrides,
    )
    try:
        result = pipeline.run(until=args.until)
    except Exception as error:
        log = pipeline.console.failed_log
        in_stage = log is not None and log != pipeline.console.log_path("pipeline")
        if not in_stage and isinstance(error, (ValueError, KeyError, OSError)):
            raise  # bad input, found before any stage ran: main() prints it in one line
        return _failed(args.command, error, log)
    if result.summary:
        print()
        print(summary_markdown(result.summary))
        print()
        print(f"report: {result.report['markdown']} (figures and summary.json beside it)")
    for stage in result.stages.values():
        for model in stage.get("models", []):
            print(f"registered model: {model['uri']}")
    if "teacher" in result.stages:
        print(f"teacher test accuracy: {result.stages['teacher']['metrics']['test_accuracy']:.4f}")
    print(f"MLflow: experiment {result.experiment_name!r}, parent run {result.parent_run_id}; open it with:")
    print(f"  mlflow ui --backend-store-uri {result.tracking_uri}")
    return 0


def _failed(command: str, error: BaseException, log: str | None) -> int:
    """Print one line for an error raised while work ran: its root cause (e.g. what failed inside MONAI's "Failed to
    evaluate ConfigExpression") and the log holding the traceback; the exit code 1."""
    root = _root_cause(error)
    message = (str(root).strip().splitlines() or [""])[0]
    print(f"monai-kdx {command}: error: {type(root).__name__}: {message} (traceback: {log})", file=sys.stderr)
    return 1


def _root_cause(error: BaseException) -> BaseException:
    """The first exception of a chain (``raise ... from ...`` or raised while handling another)."""
    seen = {id(error)}
    while True:
        cause = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        if cause is None or id(cause) in seen:
            return error
        seen.add(id(cause))
        error = cause


def _parse_checkpoints(values: Sequence[str] | None, kinds: Sequence[str]) -> dict[str, str]:
    """``KIND=PATH`` entries (or one bare ``PATH`` when a single kind is compared) → {kind: path}."""
    from monai_kdx.networks import read_state_dict

    checkpoints: dict[str, str] = {}
    for value in values or []:
        kind, sep, path = value.partition("=")
        if not sep:
            if len(kinds) != 1:
                raise ValueError(f"--checkpoint {value!r}: write KIND=PATH when comparing several kinds {list(kinds)}.")
            kind, path = kinds[0], value
        if kind not in kinds:
            raise ValueError(f"--checkpoint {value!r}: kind {kind!r} is not compared; compared kinds: {list(kinds)}.")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--checkpoint {value!r}: no file at {path!r}.")
        try:
            read_state_dict(path)  # a truncated or foreign file fails here, before any data or training
        except ValueError as error:
            raise ValueError(f"--checkpoint {value!r}: {error}") from error
        checkpoints[kind] = path
    return checkpoints


def _compare_explanations(args: argparse.Namespace) -> int:
    from monai_kdx.apps.compare_explanations import run_comparison
    from monai_kdx.data.synthetic import get_generator
    from monai_kdx.explain.comparison import check_methods, comparison_markdown, write_report

    kinds = list(dict.fromkeys(args.kind or ["chest-xray-2d", "brain-mri-3d"]))
    for kind in kinds:
        get_generator(kind)  # an unknown kind fails here, naming the valid ones
    methods = check_methods(None if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()])
    checkpoints = _parse_checkpoints(args.checkpoint, kinds)
    for name, value in (
        ("--n-images", args.n_images),
        ("--spatial-size", args.spatial_size),
        ("--threads", args.threads),
    ):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}.")
    if args.tracking_uri is not None:
        from monai_kdx.tracking import check_tracking_uri

        check_tracking_uri(args.tracking_uri)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    comparisons = []
    for kind in kinds:
        print(f"{kind}: {'loading ' + checkpoints[kind] if kind in checkpoints else 'training the teacher'} ...")
        comparisons.append(
            run_comparison(
                kind,
                quick=args.quick,
                checkpoint=checkpoints.get(kind),
                methods=methods,
                n_images=args.n_images,
                spatial_size=args.spatial_size,
                seed=args.seed,
            )
        )
    paths = write_report(comparisons, args.out)
    if args.tracking_uri is not None:
        print(f"MLflow run: {_log_comparison(args.tracking_uri, comparisons, args.out)}")
    print()
    print(comparison_markdown(comparisons))
    for key, path in paths.items():
        print(f"{key}: {path}")
    failed = [f"{c.name}/{r['method']}: {r['error']}" for c in comparisons for r in c.rows if r["error"]]
    for line in failed:
        print(f"failed: {line}", file=sys.stderr)
    return 1 if failed else 0


def _log_comparison(tracking_uri: str, comparisons: Sequence, folder: str) -> str:
    """Log the comparison report and every method's scores (``<kind>/<method>/<column>``) to a new run."""
    from monai_kdx.tracking import Tracker

    kinds = [c.name for c in comparisons]
    tracker = Tracker(tracking_uri)
    run_id = tracker.start_parent("compare_explanations", "compare-explanations", params={"kinds": kinds})
    scores = {f"{c.name}/{row['method']}/{k}": v for c in comparisons for row in c.rows for k, v in row.items()}
    tracker.log_metrics(run_id, scores)
    tracker.client.log_artifacts(run_id, folder, "report")
    tracker.end(run_id)
    return run_id


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``monai-kdx`` console script."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    args = build_parser().parse_args(argv)
    handlers = {
        "make-dataset": _make_dataset,
        "demo": _demo,
        "run": _demo,
        "compare-explanations": _compare_explanations,
        "bundle": _bundle,
    }
    try:
        return handlers[args.command](args)
    except (ValueError, KeyError, OSError) as error:  # bad input: a clear message, no traceback
        print(f"monai-kdx {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
