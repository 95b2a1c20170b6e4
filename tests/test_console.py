"""The console of long jobs: libraries' output into log files, one bar per training stage, one-line errors."""

from __future__ import annotations

import io
import logging
import sys
import warnings
from pathlib import Path

import pytest
import torch

from monai_kdx import cli
from monai_kdx.apps.console import Console, TrainingProgress, key_metrics
from monai_kdx.apps.pipeline import runner


def test_capture_sends_prints_logs_and_warnings_to_the_step_log(tmp_path):
    console_stream = io.StringIO()
    console = Console(tmp_path / "logs", stream=console_stream)
    logger = logging.getLogger("monai_kdx.test_console")
    logger.propagate = False
    with console.capture("outer") as outer:
        handler = logging.StreamHandler(sys.stdout)  # made inside, as MONAI's logging.conf makes its handler
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        with console.capture("inner") as inner:
            print("printed inside")
            logger.info("logged inside")
            warnings.warn("a library warning", UserWarning, stacklevel=1)
            console.line("for people")
        logger.info("logged between")
    try:
        assert console_stream.getvalue() == "for people\n"
        inner_text = Path(inner).read_text()
        assert "printed inside" in inner_text and "logged inside" in inner_text and "a library warning" in inner_text
        assert "logged between" in Path(outer).read_text() and "logged between" not in inner_text
        assert handler.stream is sys.stdout  # given back when the block that made it ended
    finally:
        logger.removeHandler(handler)


def test_capture_logs_the_traceback_and_names_the_file(tmp_path):
    console = Console(tmp_path / "logs", stream=io.StringIO())
    with pytest.raises(RuntimeError, match="broken"), console.capture("pipeline"), console.capture("distill"):
        raise RuntimeError("broken")
    assert console.failed_log == console.log_path("distill")  # the innermost block
    text = Path(console.failed_log).read_text()
    assert "Traceback" in text and "RuntimeError: broken" in text
    assert "RuntimeError" not in Path(console.log_path("pipeline")).read_text()


def test_verbose_leaves_the_output_on_the_console(tmp_path, capsys):
    console = Console(tmp_path / "logs", verbose=True)
    with console.capture("teacher"):
        print("still on the console")
    assert "still on the console" in capsys.readouterr().out


def test_training_progress_shows_epoch_loss_and_validation_metric():
    from ignite.engine import Events
    from ignite.metrics import Accuracy
    from monai.engines import SupervisedEvaluator, SupervisedTrainer
    from monai.handlers import ValidationHandler

    torch.manual_seed(0)
    data = [{"image": torch.randn(2, 1, 4, 4), "label": torch.tensor([0, 1])} for _ in range(3)]
    network = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    def pairs(outputs):  # MONAI's decollated outputs -> (logits, labels)
        return torch.stack([o["pred"] for o in outputs]), torch.stack([torch.as_tensor(o["label"]) for o in outputs])

    accuracy = Accuracy(output_transform=pairs)
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=data, network=network, key_val_metric={"val_accuracy": accuracy}
    )
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=2,
        train_data_loader=data,
        network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.1),
        loss_function=torch.nn.CrossEntropyLoss(),
        train_handlers=[ValidationHandler(validator=evaluator, interval=1)],
    )
    stream = io.StringIO()
    progress = TrainingProgress(stream, "teacher", evaluator, interval=0)
    progress.attach(trainer)
    seen = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: seen.append(progress.text))
    trainer.run()
    assert "val_accuracy" not in seen[0]  # no validation before the first epoch ended
    shown = f"val_accuracy {evaluator.state.metrics['val_accuracy']:.3f}"
    assert seen[-1].startswith("epoch 2/2, loss ") and seen[-1].endswith(shown), seen[-1]
    loss = float(seen[-1].split("loss ")[1].split(",")[0])
    assert loss == pytest.approx(float(trainer.state.output[0]["loss"]), abs=1.0) and loss > 0
    assert "teacher:" in stream.getvalue() and progress.bar is None  # drawn, then closed


def test_training_progress_lets_a_training_error_through():
    from ignite.engine import Engine

    def step(engine, batch):
        raise RuntimeError("bad batch")

    engine = Engine(step)
    progress = TrainingProgress(io.StringIO(), "teacher")
    progress.attach(engine)
    with pytest.raises(RuntimeError, match="bad batch"):
        engine.run([0, 1], max_epochs=1)
    assert progress.bar is None


def test_key_metrics_reads_accuracies_and_how_training_ended():
    assert key_metrics({"params": 101340.0, "pointing_game": 1.0}, None, ["params", "pointing_game"]) == (
        "params 101,340 · pointing_game 1.000"
    )
    shown = key_metrics(
        {"train_accuracy": 0.9, "val_accuracy": 0.8, "test_accuracy": 0.75, "loss": 1.0},
        {"epochs_run": 1, "stop_reason": "plateau"},
    )
    assert shown == "1 epoch, stopped by plateau · val_accuracy 0.800 · test_accuracy 0.750"


def test_a_failing_stage_is_one_line_naming_its_log(tmp_path, monkeypatch, capsys):
    def failing(pipeline, run_id):
        print("library chatter")
        try:
            raise OSError("the disk is full\nand a second line")
        except OSError as error:  # as MONAI wraps what fails in a config expression
            raise RuntimeError("Failed to evaluate ConfigExpression") from error

    monkeypatch.setitem(runner.STAGE_FUNCTIONS, "teacher", failing)
    out = tmp_path / "out"
    assert cli.main(["demo", "--quick", "--out", str(out), "--until", "teacher"]) == 1
    captured = capsys.readouterr()
    error = captured.err.strip().splitlines()
    log = out / "logs" / "teacher.log"
    assert error == [f"monai-kdx demo: error: OSError: the disk is full (traceback: {log})"]  # the root cause
    assert captured.out.splitlines()[0].startswith("teacher: training the teacher")
    assert "library chatter" not in captured.out
    text = log.read_text()
    assert "library chatter" in text and "ConfigExpression" in text and "and a second line" in text


TINY_2D = ["--set", "n_samples=12", "--set", "spatial_size=32", "--set", "max_epochs=1", "--set", "patience=1"]


@pytest.mark.slow
def test_bundle_run_has_the_main_jobs_console_and_one_line_errors(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["bundle", "run", "chest_xray_2d", "train_teacher.yaml", "--out", str(out), *TINY_2D]) == 0
    printed = capsys.readouterr().out.replace("\r", "\n").split("\n")
    shown = [line for line in printed if line.strip() and "%|" not in line]  # less the bar's redraws
    assert shown[0].startswith("chest_xray_2d train_teacher.yaml: running") and len(shown) == 3, shown
    assert shown[1].startswith("train_teacher: done in ") and "val_accuracy" in shown[1]
    assert "SupervisedTrainer - INFO" in (out / "logs" / "train_teacher.log").read_text()
    assert (out / "models" / "model.pt").is_file() and (out / "data" / "datalist.json").is_file()

    # a bad setting found by the bundle itself: one line, its root cause and the log
    assert cli.main(["bundle", "run", "chest_xray_2d", "train_teacher.yaml", "--out", str(out), *TINY_2D,
                     "--set", "patience=5"]) == 1  # fmt: skip
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "ValueError: patience 5 is larger than the epoch cap" in error[0]
    assert error[0].endswith(f"(traceback: {out / 'logs' / 'train_teacher.log'})")
    # bad input before any work: exit 2, one line
    assert cli.main(["bundle", "run", "chest_xray_2d", "nope.yaml", "--out", str(tmp_path / "other")]) == 2
    assert "has no config 'nope.yaml'" in capsys.readouterr().err and not (tmp_path / "other").exists()
