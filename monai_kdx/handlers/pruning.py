"""Relevance pruning as a handler: prune ANY MONAI trainer's network by relevance during training.

:class:`RelevancePruningHandler` attaches to ``SupervisedTrainer``, :class:`~monai_kdx.engines.DistillationTrainer`
or any MONAI ``Trainer`` (an engine with ``network`` and ``optimizer``). At the start of each configured epoch:

1. measure the current network: parameters, MACs (:func:`~monai_kdx.networks.count_parameters`,
   :func:`~monai_kdx.networks.count_macs`), CPU/GPU latency of one sample, accuracy on a loader, and (optionally)
   its hierarchical CAM (:class:`~monai_kdx.explain.HierarchicalCAM`) on the first calibration batches;
2. prune a copy with :func:`~monai_kdx.pruning.prune_by_relevance` (relevance collected on the calibration
   loader, summed over ranks under ``torch.distributed`` so every rank removes the same channels);
3. measure the pruned copy the same way; the agreement between the explanations before and after is
   :func:`~monai_kdx.metrics.explanation_agreement` (mean over samples);
4. transparency gate: if the pruned copy's accuracy is below ``min_accuracy`` or its agreement below
   ``min_agreement``, the step is discarded (the network is kept as it was) and pruning stops;
5. otherwise swap the pruned network in with :func:`monai_kdx.engines.replace_network`: ``engine.network``
   (re-wrapped in ``DistributedDataParallel`` or ``DataParallel`` like the old one), the optimizer's parameter
   groups (rebuilt in place: LR schedulers keep working), the engines listed in ``evaluators`` and the
   ``save_dict`` of the ``checkpoint_savers``, and the feature captures of the trainer.

An ignite engine does not list its handlers publicly, so every evaluator that shares the trainer's network (the one
behind a ``ValidationHandler``, a test evaluator) must be listed in ``evaluators``, and every ``CheckpointSaver``
saving it in ``checkpoint_savers`` (its files are then state dicts of a pruned network: save it with
:func:`~monai_kdx.pruning.save_pruned`, as ``save_path`` does, to load it back with
:func:`~monai_kdx.pruning.load_pruned`). Other holders of the old network (e.g. explanation transforms built with
``network=@network``) must be pointed at ``engine.network`` by their owner. Distillation terms with adapters sized
to the student's channels (feature hints on a pruned layer) cannot follow a pruning step: keep those layers in
``ignored_layers`` or distil before pruning.

Measurements go to ``engine.state.metrics`` (so MONAI's ``MLFlowHandler``/``StatsHandler`` log them at the end
of the epoch) under ``<prefix>params_before``, ``<prefix>params``, ``<prefix>macs_before``, ``<prefix>macs``,
``<prefix>latency_ms_before``, ``<prefix>latency_ms``, ``<prefix>accuracy_before``, ``<prefix>accuracy``,
``<prefix>agreement``, ``<prefix>steps`` (accepted steps) and ``<prefix>stopped`` (1 once the gate stopped
pruning), and to :attr:`RelevancePruningHandler.report` (one plain dict per step). ``params``/``macs``/``latency_ms``
describe the network in use after the step; ``accuracy`` and ``agreement`` the pruned candidate right after
pruning (before fine-tuning), accepted or not; quantities not measured (``latency_repeats=0``, ``gate_batches=0``)
are left out. Under ``torch.distributed`` accuracy and agreement are summed over ranks, so every rank takes the
same gate decision and removes the same channels.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events
from torch import nn

from monai_kdx.engines.rewiring import replace_network
from monai_kdx.networks import (
    as_plain_tensor,
    check_network_spec,
    class_indices,
    count_macs,
    count_parameters,
    device_of,
    latency_ms,
    network_spec,
    restore_mode,
    split_batch,
    unwrap_network,
)
from monai_kdx.pruning import check_prunable, check_ratio, prune_by_relevance, resolve_relevance_method
from monai_kdx.pruning.persistence import architecture_spec, save_pruned

__all__ = ["RelevancePruningHandler"]


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, (tuple, list)):
        output = output[0]
    return as_plain_tensor(output)


def _all_ranks_sum(values: list[float]) -> list[float]:
    """``values`` summed over ranks under ``torch.distributed`` (so every rank takes the same gate decision)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        tensor = tensor.cuda()
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor.cpu().tolist()


class RelevancePruningHandler:
    """Prune a trainer's network by channel relevance at configured epochs, then let training fine-tune it.

    The network maps (B, C_in, H, W) in 2D or (B, C_in, H, W, D) in 3D to logits (B, num_classes); calibration
    batches are MONAI dicts (``"image"``, ``"label"``) or ``(image, label)`` pairs with labels as (B,) or (B, 1)
    class indices or (B, num_classes) one-hot.

    Args:
        calibration_loader: re-iterable loader (DataLoader or list of batches, not a generator) on which relevance
            is collected (usually the training split without augmentation).
        ratio: fraction of the *current* channels removed at each pruning epoch, in (0, 1): one float for every
            epoch or one per entry of ``epochs`` (``0.5`` twice leaves 25%).
        epochs: 1-based epoch(s) at whose start the network is pruned (before the epoch's first iteration); each
            at most the trainer's ``max_epochs``. ``1`` prunes before any training: the whole run fine-tunes.
        method: relevance method registered in :data:`monai_kdx.registry.RELEVANCE_METHODS` (``"lrp"``,
            ``"ig"`` (integrated gradients), ``"taylor"``, ``"backtrace"``, ``"magnitude"``, ``"random"``).
        builder: the network spec (``{"network": <registered name>, **arguments}``) that builds the unpruned
            architecture, for :func:`~monai_kdx.pruning.save_pruned`; default: the one recorded on the network
            (networks from :func:`~monai_kdx.networks.build_network` and :func:`~monai_kdx.pruning.load_pruned`
            carry it).
        ignored_layers: module paths never pruned (the classifier head never is).
        global_pruning: rank channels across layers instead of within each layer.
        max_batches: at most this many calibration batches per relevance collection (None: all).
        target: relevance of the ``"label"`` class or of the predicted class ``"pred"``.
        evaluators: engines (e.g. ``[@validate#evaluator, @test#evaluator]``) whose ``network`` must follow the
            pruned network: every evaluator that shares the trainer's network.
        checkpoint_savers: ``CheckpointSaver``\\ s (anything with a ``save_dict``) whose entries holding the
            network must follow the pruned one.
        accuracy_loader: loader on which accuracy before/after each step is measured (default: the calibration
            loader).
        min_accuracy: gate, in [0, 1]: discard a step whose pruned network's accuracy is below this, and stop.
        min_agreement: gate, in [-1, 1]: discard a step whose mean explanation agreement (before vs after) is
            below this, and stop.
        agreement_method: ``"cc"``, ``"rank"`` or ``"iou_top"`` (see :func:`~monai_kdx.metrics.explanation_agreement`).
        cam_mode: CAM mode of the explanations compared (``"gradcam"``, ``"gradcam++"``, ``"layercam"``,
            ``"activation"``).
        gate_batches: calibration batches explained for the agreement (0: no agreement measured; then
            ``min_agreement`` must be None).
        latency_repeats: timed forward passes of one sample (median reported; 0: latency not measured).
        save_path: when set, the final network is written there with :func:`~monai_kdx.pruning.save_pruned` at
            ``Events.COMPLETED`` (rank 0 only; attach this handler before an ``MLFlowHandler`` that logs the file).
        prefix: prefix of the keys written to ``engine.state.metrics``.

    Raises:
        ValueError: a ratio outside (0, 1) or a ratio list whose length differs from ``epochs``, epochs < 1,
            thresholds out of range, ``min_agreement`` without ``gate_batches``; before any training, from
            :meth:`attach` (an evaluator engine, an epoch beyond ``max_epochs``, an empty calibration loader) or,
            as MONAI trainers attach their handlers before setting ``network``, at ``Events.STARTED`` (an engine
            without ``network``/``optimizer``, an unsupported network such as MONAI's UNet with residual units,
            named layer, a ratio that would leave a layer with no channels, ``save_path`` without any builder).
            The network is never changed by a failing check.
        TypeError: a generator as loader, a builder that is not plain data.
        KeyError: an unknown relevance method (the registered ones are listed).

    Attributes:
        report: one plain dict per pruning step: epoch, ratio, method, accepted, reason, agreement and
            ``params``/``macs``/``latency_ms``/``accuracy`` ``_before`` and ``_after``.
        stopped: True once the gate discarded a step (no further steps are tried).

    Example (bundle YAML, in ``train#handlers`` before the ``MLFlowHandler``):
        - _target_: monai_kdx.handlers.pruning.RelevancePruningHandler
          calibration_loader: "@calibration_loader"
          ratio: 0.5
          epochs: 1
          method: lrp
          evaluators: ["@validate#evaluator"]
          save_path: "$os.path.join(@output_dir, 'pruned', 'model_pruned.pt')"
    """

    def __init__(
        self,
        calibration_loader: Iterable[Any],
        ratio: float | Sequence[float] = 0.5,
        epochs: int | Sequence[int] = 1,
        method: str = "lrp",
        builder: Mapping[str, Any] | None = None,
        ignored_layers: Sequence[str] | None = None,
        global_pruning: bool = False,
        max_batches: int | None = None,
        target: str = "label",
        evaluators: Sequence[Engine] | None = None,
        checkpoint_savers: Sequence[Any] | None = None,
        accuracy_loader: Iterable[Any] | None = None,
        min_accuracy: float | None = None,
        min_agreement: float | None = None,
        agreement_method: str = "cc",
        cam_mode: str = "gradcam",
        gate_batches: int = 1,
        latency_repeats: int = 5,
        save_path: str | None = None,
        prefix: str = "prune_",
    ) -> None:
        epoch_list = [epochs] if isinstance(epochs, numbers.Integral) else list(epochs)
        if not epoch_list or any(isinstance(e, bool) or not isinstance(e, numbers.Integral) for e in epoch_list):
            raise ValueError(f"epochs must be an int or a non-empty list of ints, got {epochs!r}.")
        if min(epoch_list) < 1 or len(set(epoch_list)) != len(epoch_list):
            raise ValueError(f"epochs must be distinct 1-based epoch numbers, got {epochs!r}.")
        ratios = list(ratio) if isinstance(ratio, Sequence) and not isinstance(ratio, str) else [ratio]
        if len(ratios) == 1:
            ratios = ratios * len(epoch_list)
        if len(ratios) != len(epoch_list):
            raise ValueError(f"ratio has {len(ratios)} entries but epochs has {len(epoch_list)}: give one or as many.")
        ratios = [check_ratio(r) for r in ratios]
        resolve_relevance_method(method)  # KeyError listing the registered methods
        if target not in ("label", "pred"):
            raise ValueError(f"target must be 'label' or 'pred', got {target!r}.")
        if min_accuracy is not None and not 0.0 <= float(min_accuracy) <= 1.0:
            raise ValueError(f"min_accuracy must be in [0, 1], got {min_accuracy}.")
        if min_agreement is not None and not -1.0 <= float(min_agreement) <= 1.0:
            raise ValueError(f"min_agreement must be in [-1, 1], got {min_agreement}.")
        from monai_kdx.metrics import AGREEMENT_METHODS

        if agreement_method not in AGREEMENT_METHODS:
            raise ValueError(f"agreement_method must be one of {AGREEMENT_METHODS}, got {agreement_method!r}.")
        if int(gate_batches) < 0 or int(latency_repeats) < 0:
            raise ValueError("gate_batches and latency_repeats must be >= 0.")
        if min_agreement is not None and int(gate_batches) == 0:
            raise ValueError("min_agreement needs gate_batches >= 1 (explanations to compare).")
        for name, loader in (("calibration_loader", calibration_loader), ("accuracy_loader", accuracy_loader)):
            if loader is not None and iter(loader) is loader:
                raise TypeError(f"{name} must be re-iterable (a DataLoader or a list of batches), not an iterator.")
        if calibration_loader is None:
            raise ValueError("calibration_loader is required.")
        self.calibration_loader = calibration_loader
        self.accuracy_loader = accuracy_loader
        self.schedule = dict(zip((int(e) for e in epoch_list), ratios, strict=True))
        self.method = method
        self.builder = None if builder is None else check_network_spec(builder)
        self.ignored_layers = list(ignored_layers) if ignored_layers is not None else None
        self.global_pruning = bool(global_pruning)
        self.max_batches = max_batches
        self.target = target
        self.evaluators = list(evaluators or [])
        self.checkpoint_savers = list(checkpoint_savers or [])
        for saver in self.checkpoint_savers:
            if not isinstance(getattr(saver, "save_dict", None), dict):
                raise ValueError(f"checkpoint saver {type(saver).__name__} has no save_dict to update after pruning.")
        self.min_accuracy = None if min_accuracy is None else float(min_accuracy)
        self.min_agreement = None if min_agreement is None else float(min_agreement)
        self.agreement_method = agreement_method
        self.cam_mode = cam_mode
        self.gate_batches = int(gate_batches)
        self.latency_repeats = int(latency_repeats)
        self.save_path = save_path
        self.prefix = prefix
        self.report: list[dict[str, Any]] = []
        self.stopped = False
        self._example: torch.Tensor | None = None

    # ------------------------------------------------------------------ attach-time checks
    def attach(self, engine: Engine) -> None:
        """Check the configuration against ``engine`` (before any training) and register the handler.

        Raises:
            ValueError, TypeError: see the class docstring.
        """
        from monai.engines import Evaluator, Trainer

        if isinstance(engine, Evaluator):
            raise ValueError("RelevancePruningHandler attaches to a trainer (it fine-tunes), not to an evaluator.")
        if not isinstance(engine, Trainer) and not hasattr(engine, "network"):
            raise ValueError(f"{type(engine).__name__} has no `network` module: attach to a MONAI trainer.")
        max_epochs = getattr(engine.state, "max_epochs", None)
        late = [e for e in self.schedule if max_epochs is not None and e > max_epochs]
        if late:
            raise ValueError(f"pruning epochs {late} are beyond the trainer's max_epochs ({max_epochs}).")
        for evaluator in self.evaluators:
            if not isinstance(getattr(evaluator, "network", None), nn.Module):
                raise ValueError(f"evaluator {type(evaluator).__name__} has no `network` to update after pruning.")
        first = next(iter(self.calibration_loader), None)
        if first is None:
            raise ValueError("the calibration loader is empty: pruning by relevance needs at least one batch.")
        self._example = as_plain_tensor(split_batch(first)[0])[:1].detach()
        if hasattr(engine, "network"):
            self._check_engine(engine)
        else:  # MONAI trainers attach their train_handlers before setting `network`: check before the first batch
            engine.add_event_handler(Events.STARTED, self._check_engine)
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        if self.save_path is not None:
            engine.add_event_handler(Events.COMPLETED, self.completed)

    def _check_engine(self, engine: Engine) -> None:
        """Network-dependent checks (at attach, or at ``Events.STARTED`` before the first iteration)."""
        network, optimizer = getattr(engine, "network", None), getattr(engine, "optimizer", None)
        if not isinstance(network, nn.Module):
            raise ValueError(f"{type(engine).__name__} has no `network` module: attach to a MONAI trainer.")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"{type(engine).__name__} has no torch `optimizer` to rebuild after pruning.")
        model = unwrap_network(network)
        self._example = self._example.to(device_of(model))
        kept = math.prod(1.0 - r for r in self.schedule.values())
        # unsupported networks (layer named) and ratios that empty a layer, traced on a copy
        check_prunable(model, self._example, self.ignored_layers, None if self.global_pruning else 1.0 - kept)
        if self.save_path is not None and self.builder is None and network_spec(model) is None:
            raise ValueError(
                "save_path needs builder={'network': <registered name>, **arguments}: the spec that builds the "
                "unpruned network (save_pruned stores it instead of pickled modules)."
            )

    # ------------------------------------------------------------------ measurements
    def _batches(self, loader: Iterable[Any], limit: int | None) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        for index, batch in enumerate(loader):
            if limit is not None and index >= limit:
                return
            image, label = split_batch(batch)
            image = as_plain_tensor(image)
            yield image, class_indices(label, image.shape[0], one_hot=True, device="cpu")

    def _accuracy(self, model: nn.Module) -> float:
        device, correct, total = device_of(model), 0, 0
        loader = self.accuracy_loader if self.accuracy_loader is not None else self.calibration_loader
        with restore_mode(model), torch.no_grad():
            for image, label in self._batches(loader, None):
                predicted = _logits(model(image.to(device))).argmax(1).cpu()
                correct += int((predicted == label).sum())
                total += len(label)
        correct, total = _all_ranks_sum([correct, total])
        return correct / max(total, 1)

    def _latency_ms(self, model: nn.Module) -> float:
        return latency_ms(model, self._example, self.latency_repeats) if self.latency_repeats else float("nan")

    def _explanations(self, model: nn.Module) -> list[torch.Tensor]:
        """Fused CAMs (B, 1, H, W[, D]) of the first ``gate_batches`` calibration batches, for their labels."""
        from monai_kdx.explain import HierarchicalCAM

        device, maps = device_of(model), []
        explainer = HierarchicalCAM(model, mode=self.cam_mode)
        for image, label in self._batches(self.calibration_loader, self.gate_batches):
            maps.append(explainer.cam(image.to(device), label.to(device)).fused.detach().cpu())
        return maps

    def _measure(self, model: nn.Module) -> dict[str, float]:
        return {
            "params": float(count_parameters(model)),
            "macs": float(count_macs(model, tuple(self._example.shape[1:]))),
            "latency_ms": self._latency_ms(model),
            "accuracy": self._accuracy(model),
        }

    # ------------------------------------------------------------------ the pruning step
    def epoch_started(self, engine: Engine) -> None:
        """Prune at the configured epochs (``Events.EPOCH_STARTED``); see the module docstring."""
        epoch = engine.state.epoch
        if epoch not in self.schedule or self.stopped:
            return
        from monai_kdx.metrics import explanation_agreement

        ratio = self.schedule[epoch]
        old = engine.network
        model = unwrap_network(old)
        before = self._measure(model)
        maps_before = self._explanations(model) if self.gate_batches else []
        pruned = prune_by_relevance(
            model,
            self.calibration_loader,
            ratio,
            method=self.method,
            example_inputs=self._example,
            ignored_layers=self.ignored_layers,
            global_pruning=self.global_pruning,
            target=self.target,
            max_batches=self.max_batches,
            builder=self.builder,
        )
        after = self._measure(pruned)
        agreement = float("nan")
        if maps_before:
            maps_after = self._explanations(pruned)
            values = [
                explanation_agreement(a, b, self.agreement_method) for a, b in zip(maps_before, maps_after, strict=True)
            ]
            total, count = _all_ranks_sum([float(torch.cat(values).sum()), float(sum(len(v) for v in values))])
            agreement = total / count
        reasons = []
        if self.min_accuracy is not None and after["accuracy"] < self.min_accuracy:
            reasons.append(f"accuracy {after['accuracy']:.4f} < min_accuracy {self.min_accuracy}")
        if self.min_agreement is not None and not agreement >= self.min_agreement:
            reasons.append(f"agreement {agreement:.4f} < min_agreement {self.min_agreement}")
        accepted = not reasons
        entry = {
            "epoch": epoch,
            "ratio": ratio,
            "method": self.method if isinstance(self.method, str) else type(self.method).__name__,
            "accepted": accepted,
            "reason": "; ".join(reasons),
            "agreement": agreement,
            **{f"{key}_before": value for key, value in before.items()},
            **{f"{key}_after": value for key, value in after.items()},
        }
        self.report.append(entry)
        if accepted:
            save_dicts = [saver.save_dict for saver in self.checkpoint_savers]
            replace_network(engine, pruned, evaluators=self.evaluators, save_dicts=save_dicts)
        else:
            self.stopped = True
            engine.logger.warning(f"pruning step at epoch {epoch} discarded and pruning stopped: {entry['reason']}.")
        current = after if accepted else before
        metrics = engine.state.metrics
        p = self.prefix
        values = {
            f"{p}params_before": before["params"],
            f"{p}params": current["params"],
            f"{p}macs_before": before["macs"],
            f"{p}macs": current["macs"],
            f"{p}latency_ms_before": before["latency_ms"],
            f"{p}latency_ms": current["latency_ms"],
            f"{p}accuracy_before": before["accuracy"],
            f"{p}accuracy": after["accuracy"],
            f"{p}steps": float(sum(e["accepted"] for e in self.report)),
            f"{p}stopped": float(self.stopped),
            f"{p}agreement": agreement,
        }
        metrics.update({key: value for key, value in values.items() if not math.isnan(value)})  # NaN: not measured

    @property
    def report_path(self) -> str | None:
        """``<save_path without extension>_report.json``, written with the pruned file (``None`` without
        ``save_path``)."""
        return None if self.save_path is None else os.path.splitext(os.fspath(self.save_path))[0] + "_report.json"

    def completed(self, engine: Engine) -> None:
        """Write the final network to ``save_path`` with :func:`~monai_kdx.pruning.save_pruned` and the pruning
        report (steps, their metrics, the final width of every layer) to :attr:`report_path` (rank 0 only)."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed and torch.distributed.get_rank() > 0:
            return
        metadata = {
            "ratio": [self.schedule[e] for e in sorted(self.schedule)],
            "epochs": sorted(self.schedule),
            "method": self.method if isinstance(self.method, str) else type(self.method).__name__,
            "steps": [
                {k: v for k, v in e.items() if not (isinstance(v, float) and math.isnan(v))} for e in self.report
            ],
        }
        save_pruned(engine.network, self.save_path, builder=self.builder, metadata=metadata)
        widths = {
            path: entry.get("out_channels", entry.get("num_features", entry.get("out_features")))
            for path, entry in architecture_spec(engine.network).items()
        }
        with open(self.report_path, "w") as stream:  # next to the file, for people and MLflow
            json.dump({**metadata, "file": os.path.abspath(self.save_path), "widths": widths}, stream, indent=2)
