"""Training that stops on its own (plateau, cap, budget), with the reason, epochs and best score recorded."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from ignite.engine import Events
from ignite.metrics import Accuracy
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import ValidationHandler
from monai.handlers.utils import from_engine

from monai_kdx.engines import replace_network
from monai_kdx.handlers import BestWeights, TrainingStop, check_stopping
from monai_kdx.networks import ShallowCNN


def _run(tmp_path, max_epochs=6, budget=None, patience=None, sleep=0.0, spatial_dims=2, min_epochs=1):
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
    budget_handler = TrainingStop(patience, budget, evaluator, str(tmp_path / "training.json"), min_epochs)
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


def test_the_budget_stops_training_only_after_the_fewest_epochs(tmp_path):
    """A budget spent by the first epoch still lets ``min_epochs`` run (then stops: the reason is the budget); the
    cap stops training earlier than that."""
    trainer, report = _run(tmp_path, max_epochs=50, budget=0.01, sleep=0.05, min_epochs=4)
    assert report["stop_reason"] == "budget" and report["epochs_run"] == 4 and report["min_epochs"] == 4
    assert report["seconds"] > 0.01  # overran: the fewest epochs come first
    trainer, report = _run(tmp_path, max_epochs=2, budget=0.01, sleep=0.05, min_epochs=4)
    assert report["stop_reason"] == "cap" and report["epochs_run"] == 2


def test_bad_stopping_settings_are_refused():
    for bad in (0, -1, True, float("nan"), "600"):
        with pytest.raises(ValueError, match="time budget must be a positive number"):
            TrainingStop(seconds=bad)
        with pytest.raises(ValueError, match="time budget must be a positive number"):
            check_stopping(5, None, bad)
    with pytest.raises(ValueError, match="patience must be an integer >= 1"):
        TrainingStop(patience=0, validator=object())
    check_stopping(None, 9, np.float32(2.5))  # no cap known (the handler's case): any patience; numpy numbers
    with pytest.raises(ValueError, match="patience needs the validator"):
        TrainingStop(patience=3)
    with pytest.raises(ValueError, match="patience 9 is larger than the epoch cap max_epochs 5"):
        check_stopping(5, 9)
    with pytest.raises(ValueError, match="max_epochs .* must be an integer >= 1"):
        check_stopping(0, None)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="min_epochs .* must be an integer >= 1"):
            TrainingStop(seconds=10, min_epochs=bad)
    check_stopping(2, None, None, min_epochs=4)  # more than the cap: the cap stops training first
    check_stopping(5, None, 30.0)


def _scripted_run(scores, spatial_dims, replace_at=None):
    """Train with a real step (SGD) while the validator's key metric follows ``scores``; record each epoch's weights
    (after its validation); optionally replace the network (a narrower one) at the start of epoch ``replace_at``."""
    torch.manual_seed(0)
    network = ShallowCNN(spatial_dims, 1, 2, channels=(4,), hidden=0)
    data = [{"image": torch.randn(4, 1, *[8] * spatial_dims), "label": torch.tensor([0, 1, 0, 1])}]
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=data, network=network, decollate=False,
        key_val_metric={"val_accuracy": Accuracy(output_transform=from_engine(["pred", "label"]))},
    )  # fmt: skip
    # the score of the epoch, written after the metric's own computation and before the validator completes
    evaluator.add_event_handler(
        Events.EPOCH_COMPLETED(after=0), lambda e: e.state.metrics.update(val_accuracy=scores[e.state.epoch - 1])
    )
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=len(scores), train_data_loader=data, network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.5), loss_function=torch.nn.CrossEntropyLoss(),
        train_handlers=[BestWeights(evaluator), ValidationHandler(1, evaluator, epoch_level=True)], decollate=False,
    )  # fmt: skip
    if replace_at is not None:
        narrower = ShallowCNN(spatial_dims, 1, 2, channels=(2,), hidden=0)
        trainer.add_event_handler(
            Events.EPOCH_STARTED(once=replace_at), lambda e: replace_network(e, narrower, evaluators=[evaluator])
        )
    weights = []
    trainer.add_event_handler(
        Events.EPOCH_COMPLETED,
        lambda e: weights.append({k: v.clone() for k, v in e.network.state_dict().items()}),
    )
    trainer.run()
    return trainer, weights


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_best_weights_are_put_back_when_training_completes(spatial_dims):
    trainer, weights = _scripted_run([0.5, 0.9, 0.7, 0.6], spatial_dims)
    final = trainer.network.state_dict()
    assert not torch.equal(weights[1]["blocks.0.0.weight"], weights[3]["blocks.0.0.weight"])  # training moved them
    for key, value in final.items():
        assert torch.equal(value, weights[1][key]), key  # epoch 2's, the best validation


def test_best_weights_start_over_when_the_network_is_replaced():
    # epoch 1 scores best, but the network trained from epoch 3 on is another one: its best (epoch 4) is restored
    trainer, weights = _scripted_run([0.9, 0.5, 0.6, 0.7], 2, replace_at=3)
    assert trainer.network.blocks[0][0].out_channels == 2
    for key, value in trainer.network.state_dict().items():
        assert torch.equal(value, weights[3][key]), key


def test_best_weights_need_an_engine():
    with pytest.raises(TypeError, match="validator must be an ignite Engine"):
        BestWeights("validate")
