"""Guards that stop a training run at the first sign of numerical failure, naming where it happened.

A NaN in one image makes the loss NaN; the optimizer step then writes NaN into every weight and the run goes on
training a broken model, epoch after epoch, with nothing but ``nan`` in the logs. :class:`FiniteGuard` raises in
the iteration that produced the non-finite value (in a MONAI trainer after the backward pass, before the optimizer
step), naming the epoch, the iteration and the files of the batch, so the culprit can be found and removed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents

__all__ = ["FiniteGuard"]


class FiniteGuard:
    """Raise ``FloatingPointError`` when the loss or another scalar output of an iteration is not finite.

    Works with any ignite engine and every MONAI trainer (``SupervisedTrainer``, ``DistillationTrainer``, ...),
    with or without decollation: the engine's output may be a dict (``{"loss": ..., "kd": ..., ...}``), a list
    of per-sample dicts (MONAI's decollated output, each holding the batch's scalars), or a scalar. Every
    scalar entry (a number or a one-element tensor: ``loss``, and e.g. ``task``, ``kd``, ``saliency``) is
    checked; non-scalar entries (``pred``, ``image``) are not.

    The message names the epoch, the iteration (within the epoch and overall), the non-finite entries and,
    when the batch's images are MONAI ``MetaTensor``\\ s carrying ``filename_or_obj`` in their metadata, the
    files of the batch, and separately those whose image holds NaN or infinite values. In a MONAI trainer the check
    runs at ``IterationEvents.BACKWARD_COMPLETED``: the loss is complete (a saliency term added at
    ``LOSS_COMPLETED`` included) and the optimizer has not stepped, so the weights in memory stay finite; in any
    other engine it runs at ``ITERATION_COMPLETED``.

    Args:
        image_key: batch key of the images whose metadata names the files (MONAI's ``"image"``).

    Raises:
        ValueError: ``image_key`` not a non-empty string.
        FloatingPointError: (during training) a non-finite scalar output, with the message described above.

    Example (bundle YAML, appended to ``train#handlers``):
        - _target_: monai_kdx.handlers.FiniteGuard
    """

    def __init__(self, image_key: str = "image") -> None:
        if not isinstance(image_key, str) or not image_key:
            raise ValueError(f"image_key must be a non-empty string, got {image_key!r}.")
        self.image_key = image_key

    def attach(self, engine: Engine) -> None:
        """Check every iteration's output of ``engine`` (before the optimizer step in a MONAI trainer)."""
        try:
            engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)
        except ValueError:  # not a MONAI trainer: the event is not registered
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        """Raise ``FloatingPointError`` if a scalar of ``engine.state.output`` is NaN or infinite."""
        bad = _non_finite_scalars(engine.state.output)
        if not bad:
            return
        state = engine.state
        in_epoch = (state.iteration - 1) % state.epoch_length + 1 if state.epoch_length else state.iteration
        values = ", ".join(f"{key}={value}" for key, value in bad.items())
        message = f"non-finite training output at epoch {state.epoch}, iteration {in_epoch} "
        message += f"(overall iteration {state.iteration}): {values}."
        files, bad_files = self._files(state.batch)
        if bad_files:
            message += f" Images with NaN or infinite values: {bad_files}."
        if files:
            message += f" Files of the batch: {files}."
        else:
            message += f" The batch carries no file names (no MetaTensor {self.image_key!r} with filename_or_obj)."
        raise FloatingPointError(message)

    def _files(self, batch: Any) -> tuple[list[str], list[str]]:
        """All file names of the batch and those whose image is not finite (both empty without metadata)."""
        items = batch if isinstance(batch, Sequence) and not isinstance(batch, (str, torch.Tensor)) else [batch]
        files: list[str] = []
        bad_files: list[str] = []
        for item in items:
            image = item.get(self.image_key) if isinstance(item, Mapping) else None
            names = getattr(image, "meta", {}).get("filename_or_obj") if isinstance(image, torch.Tensor) else None
            if names is None or len(names) == 0:
                continue
            names = [names] if isinstance(names, str) else [str(name) for name in names]  # decollated or batch
            pixels = image.detach().as_subclass(torch.Tensor)
            if pixels.numel() % len(names) == 0:
                finite = torch.isfinite(pixels.reshape(len(names), -1)).all(dim=1).tolist()
                bad_files += [name for name, ok in zip(names, finite, strict=True) if not ok]
            files += names
        return files, bad_files


def _non_finite_scalars(output: Any) -> dict[str, float]:
    """Name → value of the scalar entries of an engine output that are NaN or infinite."""
    if isinstance(output, Mapping):
        items = [output]
    elif isinstance(output, Sequence) and not isinstance(output, str) and all(isinstance(o, Mapping) for o in output):
        items = list(output)
    else:
        items = [{"output": output}]
    bad: dict[str, float] = {}
    for item in items:
        for key, value in item.items():
            number = _scalar(value)
            if number is not None and not math.isfinite(number) and key not in bad:
                bad[str(key)] = number
    return bad


def _scalar(value: Any) -> float | None:
    """The float of a number or a one-element floating tensor, None for anything else."""
    if isinstance(value, torch.Tensor):
        return float(value.detach().reshape(())) if value.numel() == 1 and value.is_floating_point() else None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return None
