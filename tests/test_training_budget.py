"""Training that stops on its own: the reason (plateau, cap, budget), epochs and best score, recorded."""

from __future__ import annotations

import json
import time

import pytest
import torch
from ignite.engine import Events
from ignite.metrics import Accuracy
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import EarlyStopHandler, ValidationHandler
from monai.handlers.utils import from_engine

from monai_kdx.handlers import TrainingBudget
from monai_kdx.networks import ShallowCNN


def _run(tmp_path, max_epochs=6, budget=None, patience=None, sleep=0.0, spatial_dims=2):
    torch.manual_seed(0)
    network = ShallowCNN(spatial_dims, 1, 2, channels=(4,), hidden=0)
    data = [{"image": torch.randn(4, 1, *[8] * spatial_dims), "label": torch.tensor([0, 1, 0, 1])}]
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=data,
        network=network,
        key_val_metric={"val_accuracy": Accuracy(output_transform=from_engine(["pred", "label"]))},
        decollate=False,
    )
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=max_epochs, train_data_loader=data, network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.0), loss_function=torch.nn.CrossEntropyLoss(),
        train_handlers=[ValidationHandler(1, evaluator, epoch_level=True)], decollate=False,
    )  # fmt: skip
    if patience is not None:  # the accuracy never improves (lr 0): the plateau stops after `patience` epochs
        EarlyStopHandler(patience, lambda engine: engine.state.metrics["val_accuracy"], trainer).attach(evaluator)
    if sleep:
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda _: time.sleep(sleep))
    budget_handler = TrainingBudget(budget, evaluator, str(tmp_path / "training.json"))
    budget_handler.attach(trainer)
    trainer.run()
    return trainer, json.loads((tmp_path / "training.json").read_text())


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_the_cap_is_recorded_with_the_best_score(tmp_path, spatial_dims):
    trainer, report = _run(tmp_path, max_epochs=3, spatial_dims=spatial_dims)
    assert report["stop_reason"] == "cap" and report["epochs_run"] == 3 == report["max_epochs"]
    assert report["metric_name"] == "val_accuracy" and report["best_metric_epoch"] == 1
    assert trainer.state.metrics["stopped_by_cap"] == 1.0 and trainer.state.metrics["epochs_run"] == 3


def test_a_plateau_stops_before_the_cap(tmp_path):
    trainer, report = _run(tmp_path, max_epochs=20, patience=2)
    assert report["stop_reason"] == "plateau" and report["epochs_run"] == 3
    assert trainer.state.metrics["stopped_by_plateau"] == 1.0


def test_the_budget_stops_when_the_next_epoch_would_not_fit(tmp_path):
    trainer, report = _run(tmp_path, max_epochs=50, budget=0.35, sleep=0.1)
    assert report["stop_reason"] == "budget" and 1 <= report["epochs_run"] <= 3
    assert report["seconds"] <= 0.35 and report["budget_seconds"] == 0.35


def test_a_budget_must_be_positive():
    for bad in (0, -1, True):
        with pytest.raises(ValueError, match="time budget must be a positive number"):
            TrainingBudget(bad)
