"""Training that stops on its own (plateau, cap, budget), with the reason, epochs and best score recorded."""

from __future__ import annotations

import json
import time

import pytest
import torch
from ignite.engine import Events
from ignite.metrics import Accuracy
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import ValidationHandler
from monai.handlers.utils import from_engine

from monai_kdx.handlers import TrainingStop, check_stopping
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
    if sleep:
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda _: time.sleep(sleep))
    # the accuracy never improves (lr 0): a patience stops training `patience` epochs after the first
    budget_handler = TrainingStop(patience, budget, evaluator, str(tmp_path / "training.json"))
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


def test_bad_stopping_settings_are_refused():
    for bad in (0, -1, True):
        with pytest.raises(ValueError, match="time budget must be a positive number"):
            TrainingStop(seconds=bad)
    with pytest.raises(ValueError, match="patience needs the validator"):
        TrainingStop(patience=3)
    with pytest.raises(ValueError, match="patience 9 is larger than the epoch cap max_epochs 5"):
        check_stopping(5, 9)
    with pytest.raises(ValueError, match="max_epochs .* must be an integer >= 1"):
        check_stopping(0, None)
    check_stopping(5, None, 30.0)
