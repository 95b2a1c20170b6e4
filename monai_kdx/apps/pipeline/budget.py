"""How long one training epoch of a stage will take, estimated before any work from one timed training step, so a
time budget too small for even one epoch is refused at once."""

from __future__ import annotations

import math
from typing import Any

import torch

from monai_kdx.networks import build_network, median_seconds

__all__ = ["estimate_epoch_seconds"]


def _step_seconds(spec: Any, batch: torch.Tensor, classes: int, train: bool = True) -> float:
    network = build_network(spec)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.0)
    labels = torch.arange(batch.shape[0]) % classes

    def step() -> None:
        if train:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(network(batch), labels).backward()
            optimizer.step()
        else:
            with torch.no_grad():
                network(batch)

    network.train(train)
    return median_seconds(step, repeats=1, warmup=1)


def estimate_epoch_seconds(parser: Any, frozen: str | None = None) -> float:
    """Seconds of one training epoch (training and validation batches) of the network a bundle config trains.

    Args:
        parser: the ``ConfigParser`` of the stage's bundle configs (``network_spec``, ``batch_size``,
            ``spatial_size``, ``n_samples``, ``split_fractions``, ``num_classes``, ``teacher_def``).
        frozen: the config key of a network spec the stage also runs forward without gradients: distillation's
            teacher (``"teacher_def"``), the pruned network's source (``"network_spec"``).

    Returns:
        The estimate, in seconds on this machine (one step of a batch, times the batches of an epoch; a validation
        batch counted as a third of a training step).
    """
    spec = parser.get_parsed_content("network_spec")
    batch = int(parser.get_parsed_content("batch_size"))
    size = parser.get_parsed_content("spatial_size")
    dims = int(parser.get_parsed_content("spatial_dims"))
    n = int(parser.get_parsed_content("n_samples"))
    fractions = parser.get_parsed_content("split_fractions")
    classes = int(parser.get_parsed_content("num_classes"))
    sizes = [int(size)] * dims if isinstance(size, int) else [int(s) for s in size]
    images = torch.randn(batch, 1, *sizes)
    step = _step_seconds(spec, images, classes)
    if frozen is not None:
        step += _step_seconds(parser.get_parsed_content(frozen), images, classes, train=False)
    training, validation = (math.ceil(n * float(fraction) / batch) for fraction in fractions[:2])
    return step * (training + validation / 3)
