"""What a long job prints: a few lines a person reads on the console, everything else in log files.

:class:`Console` gives a job one line per step as it starts and ends, one progress bar per training stage (epoch,
loss, validation metric) and the final summary on the console, while MONAI's and ignite's INFO logs, library
warnings, the bundles' own bars and any traceback go to ``<log_dir>/<step>.log``; ``verbose=True`` leaves them on the
console as well (the log files are still written for tracebacks).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import IO, Any

__all__ = ["Console", "TrainingProgress", "key_metrics"]


def _stream_handlers() -> list[logging.StreamHandler]:
    """Every console-like logging handler (stream handlers that are not files) of every logger."""
    loggers = [logging.getLogger()] + [
        logger for logger in logging.Logger.manager.loggerDict.values() if isinstance(logger, logging.Logger)
    ]
    return [
        handler
        for logger in loggers
        for handler in logger.handlers
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
    ]


def _repoint(old: tuple[IO[str], ...], new: IO[str]) -> None:
    for handler in _stream_handlers():
        if handler.stream in old:
            handler.setStream(new)


def key_metrics(
    metrics: Mapping[str, float], training: Mapping[str, Any] | None = None, keys: Sequence[str] | None = None
) -> str:
    """The few numbers of a stage shown on its closing line: how the training ended and the validation and test
    accuracies, or the metrics ``keys`` (``"12 epochs, stopped by plateau · val_accuracy 0.950 · test_accuracy
    0.988"``)."""
    parts = []
    if training and training.get("epochs_run") is not None:
        epochs = int(training["epochs_run"])
        parts.append(f"{epochs} epoch{'s' if epochs != 1 else ''}, stopped by {training.get('stop_reason', '?')}")
    for key in keys if keys is not None else ("val_accuracy", "test_accuracy"):
        if key in metrics:
            value = float(metrics[key])
            parts.append(f"{key} {int(value):,}" if value.is_integer() and abs(value) > 1 else f"{key} {value:.3f}")
    return " · ".join(parts)


class TrainingProgress:
    """One progress bar over a whole training stage, on the console: epoch, mean loss of the epoch so far and the
    last validation metric.

    Attach it to a trainer after its other handlers (the validation handler runs first at each epoch's end); on a
    terminal the bar is redrawn in place, elsewhere (a log, CI) at most every ``interval`` seconds.

    Args:
        stream: where the bar is drawn (the console).
        desc: the bar's label, e.g. the stage's name.
        evaluator: the validation engine whose key metric is shown, if any.
        interval: seconds between redraws when ``stream`` is not a terminal.
    """

    def __init__(self, stream: IO[str], desc: str, evaluator: Any = None, interval: float = 30.0) -> None:
        self.stream = stream
        self.desc = desc
        self.evaluator = evaluator
        self.interval = interval
        self.bar: Any = None
        self.text = ""  # what the bar shows besides its progress: epoch, loss, validation metric
        self._loss = (0.0, 0)

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self.close)
        engine.add_event_handler(Events.TERMINATE, self.close)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._failed)

    def _failed(self, engine: Any, error: BaseException) -> None:
        self.close(engine)
        raise error  # ignite re-raises only when no handler listens: keep the error going

    def _start(self, engine: Any) -> None:
        from tqdm.auto import tqdm

        terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        total = (engine.state.max_epochs or 1) * (engine.state.epoch_length or 0) or None
        self.bar = tqdm(
            total=total,
            initial=engine.state.iteration,
            desc=f"{self.desc}:",
            file=self.stream,
            dynamic_ncols=terminal,
            ncols=None if terminal else 100,
            mininterval=0.2 if terminal else self.interval,
            leave=False,
            disable=False,
            bar_format="{desc} {percentage:3.0f}%|{bar:20}| [{elapsed}<{remaining}]",
        )

    def _epoch_started(self, engine: Any) -> None:
        self._loss = (0.0, 0)

    def _iteration(self, engine: Any) -> None:
        loss = _loss_of(engine.state.output)
        if loss is not None:
            total, count = self._loss
            self._loss = (total + loss, count + 1)
        self._postfix(engine)
        if self.bar is not None:
            self.bar.update(1)

    def _epoch_completed(self, engine: Any) -> None:
        self._postfix(engine)

    def _postfix(self, engine: Any) -> None:
        if self.bar is None:
            return
        parts = [f"epoch {engine.state.epoch}/{engine.state.max_epochs}"]
        total, count = self._loss
        if count:
            parts.append(f"loss {total / count:.3f}")
        state = getattr(self.evaluator, "state", None)
        metric = getattr(state, "key_metric_name", None) if state is not None else None
        if metric and metric in state.metrics:
            parts.append(f"{metric} {float(state.metrics[metric]):.3f}")
        self.text = ", ".join(parts)
        self.bar.set_description_str(f"{self.desc}: {self.text}", refresh=False)

    def close(self, engine: Any = None) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _loss_of(output: Any) -> float | None:
    """The loss in an engine's output (a dict, or the decollated list of dicts MONAI's trainers return)."""
    if isinstance(output, list) and output:
        output = output[0]
    if isinstance(output, Mapping) and "loss" in output:
        try:
            return float(output["loss"])
        except (TypeError, ValueError):
            return None
    return None


@contextlib.contextmanager
def _warnings_to(log: IO[str]) -> Iterator[None]:
    """Warnings shown while the block runs are written to ``log`` (whoever else was showing them)."""
    with warnings.catch_warnings():

        def show(message, category, filename, lineno, file=None, line=None):
            log.write(warnings.formatwarning(message, category, filename, lineno, line))

        warnings.showwarning = show
        yield


class Console:
    """The console of a long job and the log files behind it.

    Args:
        log_dir: where ``<step>.log`` files are written (created on first use).
        verbose: leave the libraries' logs, warnings and bars on the console too.
        stream: the console (default: the standard output when the console is made).

    Example::

        console = Console("runs/demo/logs")
        with console.capture("teacher"):       # MONAI's INFO logs go to runs/demo/logs/teacher.log
            console.line("teacher: training")  # this line goes to the console
    """

    def __init__(self, log_dir: str | os.PathLike, verbose: bool = False, stream: IO[str] | None = None) -> None:
        self.log_dir = os.fspath(log_dir)
        self.verbose = verbose
        self.stream = stream if stream is not None else sys.stdout
        self.failed_log: str | None = None

    def line(self, text: str) -> None:
        """Print one line on the console (flushed at once)."""
        print(text, file=self.stream, flush=True)

    def log_path(self, step: str) -> str:
        """The log file of ``step``."""
        return os.path.join(self.log_dir, f"{step}.log")

    def shown_path(self, step: str) -> str:
        """The log file of ``step`` as the console shows it: relative to the working folder when inside it."""
        path = os.path.abspath(self.log_path(step))
        relative = os.path.relpath(path)
        return path if relative.startswith(os.pardir) else relative

    @contextlib.contextmanager
    def capture(self, step: str) -> Iterator[str]:
        """Send what the libraries print while the block runs (stdout, stderr, logging handlers of the console,
        warnings) to ``<log_dir>/<step>.log`` (appended), unless verbose; nested blocks write to their own files.
        A traceback of an error raised in the block is written to the log, which :attr:`failed_log` then names.

        Yields:
            The log file's path.
        """
        os.makedirs(self.log_dir, exist_ok=True)
        path = self.log_path(step)
        with open(path, "a", buffering=1) as log:
            log.write(f"--- {step}: {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            previous = (sys.stdout, sys.stderr)
            try:
                if self.verbose:
                    yield path
                else:
                    _repoint(previous, log)
                    try:
                        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), _warnings_to(log):
                            yield path
                    finally:
                        _repoint((log,), previous[0])
            except BaseException as error:
                if self.failed_log is None:  # the innermost block that saw it
                    log.write("".join(traceback.format_exception(error)))
                    self.failed_log = path
                raise

    def training_progress(self, desc: str) -> Callable[[Any], None]:
        """A function that attaches a :class:`TrainingProgress` to a workflow's trainer (``train#trainer``, with
        ``validate#evaluator`` when the workflow has one): the ``on_initialized`` callback of
        :func:`monai_kdx.apps.pipeline.run_bundle`."""

        def attach(workflow: Any) -> None:
            parsed = workflow.parser.get_parsed_content
            try:
                trainer = parsed("train#trainer")
            except KeyError:
                return
            try:
                evaluator = parsed("validate#evaluator")
            except KeyError:
                evaluator = None
            TrainingProgress(self.stream, desc, evaluator).attach(trainer)

        return attach
