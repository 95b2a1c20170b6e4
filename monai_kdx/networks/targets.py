"""Tensors and class targets as every capability reads them: plain tensors from MONAI ``MetaTensor``\\ s, the image
and label of a batch, and labels or explanation targets as checked class indices.

One home for the conversion "whatever the user or the data gives → (B,) class indices", with the checks that make
bad targets fail loudly instead of silently: fractional values (``1.7``) are refused rather than truncated,
booleans and strings are refused, one-hot rows are accepted only where asked for, and indices are checked against
the number of classes.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "Target",
    "as_plain_tensor",
    "float32_or_wider",
    "device_of",
    "split_batch",
    "class_indices",
    "resolve_targets",
]

Target = int | torch.Tensor | None
"""An explanation target: None (each sample's predicted class), one class for all samples, or one per sample."""


def as_plain_tensor(tensor: Any) -> torch.Tensor:
    """A plain ``torch.Tensor``: a MONAI ``MetaTensor`` loses its metadata (not needed for computing), anything
    else goes through ``torch.as_tensor``."""
    if isinstance(tensor, torch.Tensor):
        return tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor
    return torch.as_tensor(tensor)


def float32_or_wider(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or unchanged when it is already float32 or wider (float64).

    Metrics and losses sum and square over every pixel/voxel: in float16 a 64x64 map's sum of squares overflows
    (65504 is its largest value) and bfloat16 keeps three significant digits, so they compute in float32 at
    least, whatever the dtype of their inputs (and under autocast).

    Args:
        x: a tensor of any shape and dtype (integer and boolean tensors become float32).

    Returns:
        ``x`` with dtype ``torch.promote_types(x.dtype, torch.float32)``, same shape.
    """
    return x.to(torch.promote_types(x.dtype, torch.float32))


def device_of(module: nn.Module) -> torch.device:
    """The device of a module's first parameter (CPU for a module without parameters)."""
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def split_batch(batch: Any) -> tuple[torch.Tensor, Any]:
    """Image and label of a batch.

    Args:
        batch: a MONAI dict batch with ``"image"`` (and ``"label"``), an ``(image, label)`` pair, or an image tensor.

    Returns:
        ``(image, label)``; ``label`` is None when the batch has none.

    Raises:
        TypeError: a batch of another kind.
    """
    if isinstance(batch, Mapping):
        if "image" not in batch:
            raise TypeError(f"a dict batch needs an 'image' key; it has {sorted(map(str, batch))}.")
        return batch["image"], batch.get("label")
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    if isinstance(batch, torch.Tensor):
        return batch, None
    raise TypeError(
        f"batches must be dicts with 'image' and 'label', (image, label) pairs or tensors, got {type(batch).__name__}."
    )


def class_indices(
    target: Any,
    batch_size: int | None = None,
    num_classes: int | None = None,
    *,
    one_hot: bool = False,
    broadcast: bool = False,
    name: str = "label",
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Check and convert class targets to a (B,) long tensor.

    Args:
        target: an int, a sequence or array of ints, or a tensor (B,) or (B, 1) of class indices; floating values
            are accepted only when they are whole numbers (``2.0``, e.g. labels read from NIfTI metadata);
            with ``one_hot`` also (B, K) rows with exactly one 1 and zeros elsewhere.
        batch_size: the number of samples the targets must cover (None: not checked).
        num_classes: indices must be in ``[0, num_classes)`` (None: only non-negative).
        one_hot: accept (B, K) one-hot rows (converted to their index).
        broadcast: a single target is used for every sample of the batch.
        name: what the targets are called in error messages (``"label"``, ``"target"``, ``"class_idx"``).
        device: where to put the result (default: the target tensor's device, or the CPU).

    Returns:
        (B,) long tensor of class indices.

    Raises:
        TypeError: strings, booleans, ``None`` or objects that are not numbers.
        ValueError: fractional or non-finite values, negative indices, indices ``>= num_classes``, one-hot rows
            that are not one-hot (or any (B, K) target without ``one_hot``), a length that differs from
            ``batch_size``; the message names the offending entry.
    """
    if target is None or isinstance(target, (str, bytes, bool)):
        raise TypeError(f"{name} must be integer class indices, got {target!r}.")
    if isinstance(target, torch.Tensor):
        values = as_plain_tensor(target).detach()
    else:
        array = np.asarray(target)
        if array.dtype.kind not in "biuf":
            raise TypeError(f"{name} must be integer class indices, got {target!r} ({array.dtype}).")
        values = torch.as_tensor(array)
    if values.dtype == torch.bool:
        raise TypeError(f"{name} must be integer class indices, not booleans.")
    if values.ndim == 2 and values.shape[1] > 1:
        if not one_hot:
            raise ValueError(
                f"{name} of shape {tuple(values.shape)} looks one-hot; expected class indices of shape (B,) or (B, 1)."
            )
        bad = ((values != 0) & (values != 1)).any(dim=1) | (values.sum(dim=1) != 1)
        if bad.any():
            row = int(torch.nonzero(bad)[0])
            raise ValueError(f"{name} row {row} ({values[row].tolist()}) is not one-hot (a single 1, zeros elsewhere).")
        values = values.argmax(dim=1)
    values = values.reshape(-1)
    if values.is_floating_point():
        bad = ~torch.isfinite(values) | (values != values.round())
        if bad.any():
            index = int(torch.nonzero(bad)[0])
            raise ValueError(f"{name} entry {index} is {values[index].item():.6g}, not a whole-number class index.")
    values = values.long()
    if broadcast and values.numel() == 1 and batch_size is not None:
        values = values.expand(batch_size)
    if batch_size is not None and values.numel() != batch_size:
        raise ValueError(f"{name} has {values.numel()} entries for a batch of {batch_size}.")
    outside = values < 0
    if num_classes is not None:
        outside |= values >= num_classes
    if outside.any():
        index = int(torch.nonzero(outside)[0])
        allowed = f"for a network with {num_classes} classes" if num_classes is not None else "(negative)"
        raise ValueError(f"{name} entry {index} is class {int(values[index])}, out of range {allowed}.")
    return values.to(device) if device is not None else values


def resolve_targets(target: Target, logits: torch.Tensor, name: str = "target") -> torch.Tensor:
    """Per-sample classes to explain: ``None`` → each sample's own argmax, an int → the same class for all, a
    tensor or sequence of B ints → one class per sample.

    Args:
        target: see above.
        logits: (B, num_classes) network output.
        name: what the targets are called in error messages.

    Returns:
        (B,) long tensor on ``logits.device``.

    Raises:
        ValueError, TypeError: see :func:`class_indices`.
    """
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise TypeError(f"expected classifier logits of shape (B, num_classes), got {shape}.")
    if target is None:
        return logits.detach().argmax(dim=-1)
    if isinstance(target, numbers.Integral) and not isinstance(target, bool):
        target = [int(target)]
    return class_indices(target, logits.shape[0], logits.shape[-1], broadcast=True, name=name, device=logits.device)
