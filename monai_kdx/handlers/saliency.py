"""Saliency-guided training as a handler: add a saliency loss to ANY MONAI trainer's loss.

:class:`SaliencyGuidance` attaches to ``SupervisedTrainer``, :class:`~monai_kdx.engines.DistillationTrainer`
or any other MONAI ``Trainer`` and uses MONAI's own iteration events, so the trainer's iteration (AMP,
gradient accumulation, DDP, decollation, other handlers) stays MONAI's:

1. ``Events.ITERATION_STARTED``: register a forward pre-hook and a forward hook on ``engine.network``;
   on the first call of the network in the iteration, the pre-hook captures the loss's layers (one
   :class:`~monai_kdx.networks.FeatureCapture`, which accepts DDP's ``module.`` prefix) and, when the loss
   needs input gradients, replaces the input with ``x.detach().requires_grad_(True)``; the forward hook
   records the logits and removes every hook (later calls, e.g. a GAIN masked forward, are not captured).
   A DistillationTrainer runs its teacher first, but the teacher is another module: only the student
   (``engine.network``) is seen.
2. ``IterationEvents.LOSS_COMPLETED`` (after the trainer's loss, before backward, inside autocast): read
   the target map from ``engine.state.batch[target_key]`` and the labels from ``engine.state.output["label"]``,
   compute the saliency loss, add ``weight * value`` to ``engine.state.output["loss"]`` and store the
   (detached) value under ``name`` in ``engine.state.output``, so ``MLFlowHandler``/``StatsHandler`` with
   :func:`monai_kdx.handlers.scalars` log it.
3. ``Events.ITERATION_COMPLETED`` and ``Events.EXCEPTION_RAISED``: remove any hook left and drop every
   captured tensor, so nothing outlives the iteration and host memory stays flat.

Evaluators are refused: saliency is a training-time regularizer; inference is unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines import Evaluator
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys
from torch import nn

from monai_kdx.losses.checks import check_weight
from monai_kdx.losses.saliency import SaliencyContext, SaliencyLoss, check_inputs, check_target_map
from monai_kdx.networks import FeatureCapture

__all__ = ["SaliencyGuidance"]


class SaliencyGuidance:
    """Add a saliency regularizer (e.g. :class:`~monai_kdx.losses.saliency.SaliencyAlignmentLoss` against
    eye-gaze) to a MONAI trainer's loss: ``loss = task loss + weight · saliency loss``.

    The batch (a dict, as MONAI's dictionary datasets give) must hold the target map under ``target_key``:
    (B, 1, H, W) in 2D or (B, 1, H, W, D) in 3D, the images' spatial shape, non-negative (random spatial
    transforms must be applied to the image and the map alike). The trainer's ``label`` output gives each
    sample's true class, whose saliency is aligned.

    Args:
        loss: a :class:`~monai_kdx.losses.saliency.SaliencyLoss`, or the name of one registered in
            :data:`monai_kdx.registry.SALIENCY_LOSSES` (built with default arguments).
        target_key: batch key of the target map (``"gaze"``, ``"mask"``, ...).
        weight: factor on the saliency loss (0 records it without training on it).
        name: ``engine.state.output`` key of the (detached, unweighted) saliency loss.
        start_epoch: first epoch (1-based) with the saliency term; earlier epochs train on the task loss
            alone (a warm-up, so the saliency of a still random classifier does not steer the first steps)
            and record no saliency value.

    Raises:
        ValueError: a loss that is not a saliency loss, a negative or non-finite weight, an empty name or
            one of MONAI's own output keys; from :meth:`attach`: an evaluator, an engine without a network
            or MONAI's iteration events, or a layer path the network does not have (close matches listed);
            during training, before the backward pass: a batch whose image (``batch['image']``) or target map
            (``batch[target_key]``) holds NaN or infinite values, naming the key and the samples.

    Example (bundle YAML, appended to ``train#handlers``):
        - _target_: monai_kdx.handlers.saliency.SaliencyGuidance
          loss: {_target_: monai_kdx.losses.saliency.SaliencyAlignmentLoss, layer: blocks.2, divergence: kl}
          target_key: gaze
          weight: 1.0
    """

    def __init__(
        self,
        loss: SaliencyLoss | str,
        target_key: str = "gaze",
        weight: float = 1.0,
        name: str = "saliency",
        start_epoch: int = 1,
    ) -> None:
        if isinstance(loss, str):
            from monai_kdx.registry import SALIENCY_LOSSES

            loss = SALIENCY_LOSSES.build(loss)
        if not isinstance(loss, SaliencyLoss):
            raise ValueError(f"loss must be a SaliencyLoss (monai_kdx.losses.saliency), got {type(loss).__name__}.")
        weight = check_weight("weight", weight)
        if not isinstance(name, str) or not name or name in ("loss", "pred", "label", "image"):
            raise ValueError(f"name must be a new engine output key, not {name!r}.")
        if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 1:
            raise ValueError(f"start_epoch must be an integer >= 1, got {start_epoch!r}.")
        self.start_epoch = start_epoch
        self.loss = loss
        self.target_key = target_key
        self.weight = weight
        self.name = name
        self._capture: FeatureCapture | None = None  # the capture active in this iteration
        self._capture_cache: tuple[nn.Module, list[str], FeatureCapture] | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._inputs: torch.Tensor | None = None
        self._logits: torch.Tensor | None = None
        self._probing = False

    # ------------------------------------------------------------------------------------------- attach
    def attach(self, engine: Engine) -> None:
        """Register the handler's event handlers on a MONAI trainer, validating the configuration first.

        Raises:
            ValueError: see the class docs.
        """
        if isinstance(engine, Evaluator):
            raise ValueError(
                f"SaliencyGuidance trains with a saliency loss and cannot attach to the evaluator "
                f"{type(engine).__name__}: attach it to the trainer (train#handlers); inference is unchanged."
            )
        if IterationEvents.LOSS_COMPLETED not in getattr(engine, "_allowed_events", ()):
            raise ValueError(
                f"{type(engine).__name__} does not fire MONAI's IterationEvents.LOSS_COMPLETED; use a MONAI "
                "Trainer (SupervisedTrainer, DistillationTrainer, ...)."
            )
        if hasattr(engine, "network"):
            self._check_engine(engine)
        else:  # MONAI trainers attach their train_handlers before setting `network`: check before the first batch
            engine.add_event_handler(Events.STARTED, self._check_engine)
        engine.add_event_handler(Events.ITERATION_STARTED, self._iteration_started)
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self._loss_completed)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._release)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._exception_raised)
        engine.add_event_handler(Events.COMPLETED, self._release)

    def _check_engine(self, engine: Engine) -> None:
        network = getattr(engine, "network", None)
        if not isinstance(network, nn.Module):
            raise ValueError(
                f"SaliencyGuidance needs a MONAI trainer with a network; {type(engine).__name__} has none."
            )
        self.loss.check_network(network)  # layer paths (ValueError with close matches)

    # -------------------------------------------------------------------------------------------- hooks
    def _active(self, engine: Engine) -> bool:
        return engine.state.epoch >= self.start_epoch

    def _iteration_started(self, engine: Engine) -> None:
        self._release()
        if not self._active(engine):
            return
        network = engine.network
        self._handles = [
            network.register_forward_pre_hook(self._pre_forward),
            network.register_forward_hook(self._post_forward),
        ]

    def _pre_forward(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if self._probing or self._capture is not None:
            return None
        if not args or not isinstance(args[0], torch.Tensor):
            raise TypeError("SaliencyGuidance expects the network's first argument to be the image tensor.")
        inputs = args[0]
        if self.loss.needs_layer_resolution:  # pick the layer from a probe forward (first iteration only)
            self._probing = True
            try:
                self.loss.resolve_layers(module, inputs)
            finally:
                self._probing = False
        layers = list(self.loss.layers)
        if self._capture_cache is None or self._capture_cache[0] is not module or self._capture_cache[1] != layers:
            self._capture_cache = (module, layers, FeatureCapture(module, layers))  # paths resolved once
        self._capture = self._capture_cache[2].__enter__()
        if self.loss.needs_input_grad:
            inputs = inputs.detach().requires_grad_(True)
        self._inputs = inputs
        return (inputs, *args[1:]) if inputs is not args[0] else None

    def _post_forward(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._probing or self._logits is not None or self._capture is None:
            return
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"SaliencyGuidance expects the network to return logits, got {type(output).__name__}.")
        self._logits = output
        self._capture.remove()  # keep the features of this first call only
        self._remove_hooks()

    # ------------------------------------------------------------------------------------------- loss
    def _loss_completed(self, engine: Engine) -> None:
        if not self._active(engine):
            return
        try:
            if self._logits is None or self._inputs is None:
                raise RuntimeError(
                    "SaliencyGuidance saw no call of engine.network in this iteration before the loss; it needs "
                    "the trainer to run engine.network on the batch images."
                )
            batch = engine.state.batch
            if not isinstance(batch, dict) or self.target_key not in batch:
                keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
                raise ValueError(
                    f"the batch has no target map {self.target_key!r} (batch keys: {keys}); load it in the "
                    "training preprocessing and keep it in SelectItemsd."
                )
            image_key = str(CommonKeys.IMAGE)  # where MONAI's prepare_batch takes the network input from
            image_name = f"batch[{image_key!r}]" if image_key in batch else "the network input"
            check_inputs(self._inputs, image_name)  # before backward: a NaN image gives NaN gradients
            target_map = batch[self.target_key]
            if not isinstance(target_map, torch.Tensor):
                raise ValueError(f"batch[{self.target_key!r}] must be a tensor, got {type(target_map).__name__}.")
            target_map = target_map.as_subclass(torch.Tensor).to(self._inputs.device, non_blocking=True)
            target_map = check_target_map(target_map, self._inputs, f"batch[{self.target_key!r}]")
            output = engine.state.output
            context = SaliencyContext(
                network=engine.network,
                inputs=self._inputs,
                logits=self._logits,
                features={path: self._capture[path] for path in self.loss.layers},
                targets=output["label"],
                target_map=target_map,
            )
            value = self.loss.from_context(context)
            output["loss"] = output["loss"] + self.weight * value.to(output["loss"].dtype)
            output[self.name] = value.detach()
        finally:
            self._release()

    # ---------------------------------------------------------------------------------------- cleanup
    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _release(self, engine: Engine | None = None) -> None:
        """Remove every hook and drop every tensor held for the current iteration (idempotent)."""
        self._remove_hooks()
        if self._capture is not None:
            self._capture.remove()
            self._capture.clear()
        self._capture = None
        self._inputs = None
        self._logits = None

    def _exception_raised(self, engine: Engine, error: BaseException) -> None:
        """Release hooks and tensors, then re-raise: registering an ``EXCEPTION_RAISED`` handler would otherwise
        make ignite swallow the error. (A handler registered earlier that re-raises first, e.g. MONAI's
        ``StatsHandler``, leaves the release to the loss step's own ``finally``: the forward hooks remove
        themselves after the next forward pass at the latest.)"""
        self._release()
        raise error

    @property
    def holds_tensors(self) -> bool:
        """Whether the handler currently holds any tensor or hook (False between iterations)."""
        captured = self._capture is not None and len(self._capture) > 0
        return bool(self._handles) or captured or self._inputs is not None or self._logits is not None
