"""What a network costs: parameters, multiply-accumulates, and wall time (the one timer every measurement uses:
latency in the pruning handler and the main job's summary, explanation time, the benchmarks)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .capture import unwrap_network
from .modes import restore_mode
from .targets import device_of

__all__ = ["count_parameters", "count_macs", "timed", "median_seconds", "latency_ms", "latency_ratio"]


def count_parameters(network: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (optionally only those with ``requires_grad``)."""
    return sum(p.numel() for p in unwrap_network(network).parameters() if p.requires_grad or not trainable_only)


def count_macs(network: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass for one input of ``input_shape`` (C, *spatial),
    counted over convolutions and linear layers (the dominant cost; norms and activations ignored).

    Args:
        network: the model (evaluated in eval mode, restored afterwards, without gradients).
        input_shape: e.g. ``(1, 64, 64, 64)``.
    """
    model = unwrap_network(network)
    total = 0

    def conv_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        kernel = int(torch.tensor(module.kernel_size).prod())
        total += output.numel() * (module.in_channels // module.groups) * kernel

    def linear_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        total += output.numel() * module.in_features

    handles = []
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    try:
        with restore_mode(model), torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device_of(model)))
    finally:
        for handle in handles:
            handle.remove()
    return total


def timed(function: Callable[[], Any], device: torch.device | str | None = None) -> tuple[Any, float]:
    """Call ``function()`` once and return its result and the wall time in seconds; on a CUDA ``device`` the
    queued GPU work is waited for before and after, so the time covers the kernels."""
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = function()
    if cuda:
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def median_seconds(
    function: Callable[[], Any], repeats: int = 5, warmup: int = 1, device: torch.device | str | None = None
) -> float:
    """Median wall time of ``function()`` over ``repeats`` calls after ``warmup`` untimed calls (see :func:`timed`).

    Raises:
        ValueError: ``repeats`` < 1 or ``warmup`` < 0.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}.")
    for _ in range(warmup):
        function()
    return statistics.median(timed(function, device)[1] for _ in range(repeats))


def latency_ms(network: nn.Module, example: torch.Tensor, repeats: int = 5) -> float:
    """Median milliseconds of one forward pass of ``example`` (eval mode, no gradients; modes restored).

    Args:
        network: the model.
        example: (B, C, *spatial) input, moved to the network's device.
        repeats: timed passes after one warm-up pass.
    """
    device = device_of(unwrap_network(network))
    example = example.to(device)
    with restore_mode(network), torch.no_grad():
        return 1000.0 * median_seconds(lambda: network(example), repeats=repeats, device=device)


def latency_ratio(
    network: nn.Module, reference: nn.Module, example: torch.Tensor, rounds: int = 15, repeats: int = 3
) -> float:
    """How long ``network`` takes for one forward pass of ``example`` as a fraction of ``reference``'s: the median
    over ``rounds`` of the ratio of their :func:`latency_ms`, the two timed in turn within each round, so that a
    machine whose speed drifts during the measurement (shared, throttled) slows both sides of a ratio alike.

    Args:
        network: the model measured, e.g. a pruned network.
        reference: the model it is measured against, e.g. the unpruned one.
        example: (B, C, *spatial) input.
        rounds: ratios taken (>= 1).
        repeats: timed passes of each model in a round (after one warm-up pass).

    Raises:
        ValueError: ``rounds`` or ``repeats`` < 1.
    """
    if rounds < 1 or repeats < 1:
        raise ValueError(f"rounds and repeats must be >= 1, got {rounds} and {repeats}.")
    ratios = [latency_ms(network, example, repeats) / latency_ms(reference, example, repeats) for _ in range(rounds)]
    return statistics.median(ratios)
