"""How long the main job's work will take, estimated before any work from a few timed steps of untrained networks
(the cost of a step does not depend on the weights): one training epoch of a stage, so a time budget too small for
even one epoch is refused at once, and the explain stage, whose time is kept aside before the training stages share
the rest."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from monai_kdx.networks import build_network, median_seconds

__all__ = ["Workload", "estimate_epoch_seconds", "explanation_seconds", "step_seconds"]


@dataclass(frozen=True)
class Workload:
    """What the main job's stages run on: the images' spatial shape, their channels and the entries of each split.

    Attributes:
        shape: the spatial shape of one image as the networks see it, e.g. ``(32, 32, 32)``.
        channels: the images' channels.
        counts: ``"training"``, ``"validation"``, ``"test"`` → number of entries.
    """

    shape: tuple[int, ...]
    channels: int
    counts: Mapping[str, int]

    @classmethod
    def of(cls, parser: Any, summary: Any = None) -> Workload:
        """The workload of a bundle config's generated dataset or of a checked datalist.

        Args:
            parser: the ``ConfigParser`` of the bundle configs (``spatial_dims``, ``resize_to``; for the generated
                dataset ``spatial_size``, ``n_samples``, ``split_fractions``).
            summary: a checked datalist (:class:`monai_kdx.data.DatalistSummary`); None: the generated dataset.

        Returns:
            The workload; the images resampled to side ``resize_to`` when the config sets it.
        """
        dims = int(parser.get_parsed_content("spatial_dims"))
        resize = parser.get_parsed_content("resize_to")
        if summary is None:
            size = parser.get_parsed_content("spatial_size")
            n = int(parser.get_parsed_content("n_samples"))
            fractions = parser.get_parsed_content("split_fractions")
            counts = {"validation": round(n * float(fractions[1])), "test": round(n * float(fractions[2]))}
            counts["training"] = n - counts["validation"] - counts["test"]  # about: the splits are by class
            shape = [int(size)] * dims if isinstance(size, int) else [int(side) for side in size]
            channels = 1
        else:
            shape = list(max(summary.spatial_shapes))  # one shape unless resized
            counts = {name: int(summary.counts.get(name, 0)) for name in ("training", "validation", "test")}
            channels = int(summary.in_channels)
        return cls(tuple([int(resize)] * dims if resize is not None else shape), channels, counts)

    def images(self, batch: int, device: torch.device | str | None = None) -> torch.Tensor:
        """(batch, channels, *shape) random images on ``device``."""
        return torch.randn(batch, self.channels, *self.shape, device=device)


def step_seconds(spec: Any, batch: torch.Tensor, classes: int, train: bool = True) -> float:
    """Seconds of one training step (forward, backward, update) or, without ``train``, one forward pass without
    gradients, of the untrained network ``spec`` builds on the (B, C, *spatial) ``batch``, on the batch's device (one
    timed call after a warm-up)."""
    network = build_network(spec).to(batch.device)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.0)
    labels = torch.arange(batch.shape[0], device=batch.device) % classes

    def step() -> None:
        if train:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(network(batch), labels).backward()
            optimizer.step()
        else:
            with torch.no_grad():
                network(batch)

    network.train(train)
    return median_seconds(step, repeats=1, warmup=1, device=batch.device)


def estimate_epoch_seconds(parser: Any, workload: Workload, frozen: str | None = None) -> float:
    """Seconds of one training epoch (training and validation batches) of the network a bundle config trains.

    Args:
        parser: the ``ConfigParser`` of the stage's bundle configs (``network_spec``, ``batch_size``,
            ``num_classes``, ``device``, ``teacher_def``).
        workload: the images and splits it trains on (:meth:`Workload.of`).
        frozen: the config key of a network spec the stage also runs forward without gradients: distillation's
            teacher (``"teacher_def"``), the pruned network's source (``"network_spec"``).

    Returns:
        The estimate, in seconds on this machine and the bundle's device (one step of a batch, times the batches of
        an epoch; a validation batch counted as a third of a training step).
    """
    spec = parser.get_parsed_content("network_spec")
    batch = int(parser.get_parsed_content("batch_size"))
    classes = int(parser.get_parsed_content("num_classes"))
    images = workload.images(batch, parser.get_parsed_content("device"))
    step = step_seconds(spec, images, classes)
    if frozen is not None:
        step += step_seconds(parser.get_parsed_content(frozen), images, classes, train=False)
    training, validation = (math.ceil(workload.counts[name] / batch) for name in ("training", "validation"))
    return step * (training + validation / 3)


def explanation_seconds(
    spec: Any,
    workload: Workload,
    methods: Sequence[str],
    smoothing: float = 0.0,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Seconds of one explanation of one image, as the explain stage computes it (the map at every stage and their
    fusion, :class:`monai_kdx.transforms.HierarchicalExplanationd`), by each of ``methods``.

    Args:
        spec: the network's spec (built untrained).
        workload: the images (:meth:`Workload.of`).
        methods: explanation modes.
        smoothing: the explain stage's ``explanation_smoothing``.
        device: where the network runs (the bundle's ``device``; None: the CPU).

    Returns:
        method → seconds on this machine (one timed call after a warm-up).
    """
    from monai_kdx.transforms import HierarchicalExplanationd

    network = build_network(spec).to(device).eval()
    sample = {"image": workload.images(1)[0], "label": torch.tensor(0)}  # read on the CPU, as the stage reads it
    seconds = {}
    for method in methods:
        explain = HierarchicalExplanationd(
            "image", network, mode=method, target_key="label", smoothing=smoothing, device=device
        )
        seconds[method] = median_seconds(lambda e=explain: e(dict(sample)), repeats=1, warmup=1, device=device)
    return seconds
