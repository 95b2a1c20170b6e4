"""Tutorial 6: MLflow tracking — one run per stage under a parent run, the model registered, read back.

Run it with ``.venv/bin/python tutorials/06_mlflow_tracking.py [--quick] [--out DIR]``.

1. Create a parent run ("pipeline") and two child runs in an embedded SQLite store
   (``DIR/mlruns.db``; MONAI's ``MLFlowHandler`` refuses ``file:`` stores).
2. Train a teacher and a smaller student on the 2D chest dataset with MONAI's ``SupervisedTrainer``:
   each trainer's ``MLflowRunHandler`` is given its child run's name, so it logs into that child run
   (MONAI's handler picks the unfinished run with its name; it never starts a fluent run).
   ``MLflowModelLogger`` logs the student into the same run as an MLflow model (a
   ``save_pruned`` file, no pickled module) and registers it in the Model Registry.
3. Read everything back: the runs' tree, metrics, artifacts; load the registered model with
   ``load_classifier("models:/name/version")`` and check it predicts like the trained network;
   plot the loss curves read back from the store: ``DIR/loss_curves.png``.
4. ``check_tracking_uri`` fails fast on a server that does not answer, before any training.

Open the store afterwards with ``mlflow ui --backend-store-uri sqlite:///DIR/mlruns.db``.
"""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from ignite.engine import Events
from mlflow.tracking import MlflowClient
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedTrainer
from monai.handlers import from_engine
from monai.transforms import Compose, EnsureTyped, LoadImaged, NormalizeIntensityd

from monai_kdx.data import load_datalist, write_dataset
from monai_kdx.handlers import MLflowModelLogger, MLflowRunHandler
from monai_kdx.networks import ShallowCNN, count_parameters
from monai_kdx.tracking import (
    Tracker,
    check_tracking_uri,
    default_tracking_uri,
    load_classifier,
    run_summary,
)


def train(name: str, network, loader, uri: str, epochs: int, out: Path, register: str | None = None):
    """Train ``network`` with a MONAI trainer whose MLflow handler (MONAI's, never adopting a finished or failed run)
    logs into the run named ``name``."""
    checkpoint = out / f"{name}.pt"
    handlers = [
        MLflowRunHandler(
            tracking_uri=uri,
            experiment_name="tutorial",
            run_name=name,
            output_transform=from_engine(["loss"], first=True),
            experiment_param={"network": type(network).__name__, "params": count_parameters(network)},
            close_on_complete=True,
        )
    ]
    if register:
        builder = {"network": "ShallowCNN", "spatial_dims": 2, "in_channels": 1,
                   "out_channels": 3, "channels": [8, 16, 32]}  # fmt: skip
        handlers.append(MLflowModelLogger(checkpoint, builder=builder, registered_model_name=register))
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=epochs,
        train_data_loader=loader,
        network=network,
        optimizer=torch.optim.Adam(network.parameters(), 1e-3),
        loss_function=torch.nn.CrossEntropyLoss(),
        train_handlers=handlers,
    )
    # the checkpoint the model logger reads when training completes (registered before it: written first)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: torch.save({"model": network.state_dict()}, checkpoint))
    trainer.run()
    return handlers[-1] if register else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small images, few samples, one epoch")
    parser.add_argument("--out", default="runs/tutorial_06")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if args.quick:
        torch.set_num_threads(1)
    torch.manual_seed(0)

    # 1. the store and the run tree
    uri = check_tracking_uri(default_tracking_uri(out))
    tracker = Tracker(uri)
    parent = tracker.start_parent("tutorial", run_name="pipeline", params={"quick": args.quick})
    teacher_run = tracker.start_child(parent, "teacher")
    student_run = tracker.start_child(parent, "student")

    # 2. two trainings, each logging into its child run
    size, n, epochs = (64, 24, 1) if args.quick else (128, 120, 4)
    datalist = write_dataset(out / "data", kind="chest-xray-2d", n=n, seed=0, spatial_size=size)
    transform = Compose([LoadImaged(["image"], ensure_channel_first=True), NormalizeIntensityd("image"),
                         EnsureTyped("image", dtype=torch.float32)])  # fmt: skip
    items = [{"image": d["image"], "label": d["label"]} for d in load_datalist(datalist, "training")]
    loader = DataLoader(Dataset(items, transform), batch_size=4, shuffle=True)
    teacher = ShallowCNN(2, 1, 3, channels=(16, 32, 64, 64))
    student = ShallowCNN(2, 1, 3, channels=(8, 16, 32))
    train("teacher", teacher, loader, uri, epochs, out)
    logger = train("student", student, loader, uri, epochs, out, register="tutorial_student")
    tracker.end(parent)

    # 3. read it back
    client = MlflowClient(uri)
    print(f"parent run {parent}")
    for run in tracker.child_runs(parent):
        summary = run_summary(uri, run)
        print(f"  child {summary['run_name']}: params {summary['params']}, "
              f"metrics {sorted(summary['metrics'])}, artifacts {summary['artifacts'][:3]}...")  # fmt: skip
    print(f"student run holds the model: {logger.logged.run_id == student_run}")
    print(f"registered: {logger.logged.registry_uri}")
    model = load_classifier(logger.logged.registry_uri, uri)
    x = np.stack([transform(item)["image"].numpy() for item in items[:4]])
    student.eval()
    with torch.no_grad():
        expected = torch.softmax(student(torch.from_numpy(x)), 1).numpy()
    print(f"registered model predicts like the network: {np.allclose(model.predict(x), expected, atol=1e-5)}")

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, run_id in (("teacher", teacher_run), ("student", student_run)):
        history = client.get_metric_history(run_id, "Loss")
        ax.plot([m.step for m in history], [m.value for m in history], label=f"{name} (child run)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss")
    ax.set_title("loss curves read back from MLflow")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)
    print(f"figure: {out / 'loss_curves.png'}")

    # 4. an unreachable server is reported at once
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    try:
        check_tracking_uri(f"http://127.0.0.1:{port}", timeout=2)
    except ConnectionError as error:
        print(f"unreachable server reported: {error}")


if __name__ == "__main__":
    main()
