"""Rewiring a running MONAI trainer onto a new network (e.g. after structural pruning), on public APIs only.

Pruning creates a new module with new parameters. :func:`replace_network` points everything that must follow at it:

- ``engine.network``, wrapped in ``DistributedDataParallel``/``DataParallel`` like the old one;
- the optimizer, rebuilt *in place*: every parameter group keeps its hyper-parameters and gets the new network's
  parameters (matched by name) instead of the old ones; the state of replaced parameters is dropped, that of other
  parameters (e.g. distillation adapters) kept. The optimizer object stays the same, so LR schedulers and checkpoint
  dicts that reference it keep working;
- the evaluators and checkpoint ``save_dict``\\ s it is given (an ignite engine does not list its handlers publicly:
  whatever else holds the old network must be passed explicitly);
- :class:`~monai_kdx.networks.FeatureCapture` objects reachable from the engine's attributes (e.g.
  :class:`~monai_kdx.engines.DistillationTrainer`'s student capture), re-resolved by path on the new network.
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping
from typing import Any

import torch
from torch import nn

from monai_kdx.networks import FeatureCapture, resolve_module, unwrap_network

__all__ = ["rewrap_like", "replace_network"]


def rewrap_like(old: nn.Module, new: nn.Module) -> nn.Module:
    """``new`` wrapped in ``DistributedDataParallel`` or ``DataParallel`` with ``old``'s settings (or ``new``)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    if isinstance(old, DistributedDataParallel):
        kwargs: dict[str, Any] = {"find_unused_parameters": old.find_unused_parameters}
        if not old.broadcast_buffers:  # the default is True (passing it at all is deprecated in recent torch)
            kwargs["broadcast_buffers"] = False
        return DistributedDataParallel(new, device_ids=old.device_ids, output_device=old.output_device, **kwargs)
    if isinstance(old, DataParallel):
        return DataParallel(new, device_ids=old.device_ids, output_device=old.output_device, dim=old.dim)
    return new


def _rebuild_optimizer(optimizer: torch.optim.Optimizer, old: nn.Module, new: nn.Module) -> None:
    names = {id(p): name for name, p in old.named_parameters()}
    fresh = dict(new.named_parameters())
    for group in optimizer.param_groups:
        params = []
        for param in group["params"]:
            if id(param) in names:
                optimizer.state.pop(param, None)
                param = fresh[names[id(param)]]
            params.append(param)
        group["params"] = params


def _rebind_captures(root: Any, old: nn.Module, new: nn.Module, max_depth: int = 2) -> None:
    """Re-resolve, by path on ``new``, every ``FeatureCapture`` hooking ``old`` that is reachable from ``root``'s
    attributes within ``max_depth`` levels."""
    old_modules = {id(module) for module in old.modules()}
    seen: set[int] = set()

    def visit(obj: Any, depth: int) -> None:
        if id(obj) in seen or depth > max_depth or isinstance(obj, (nn.Module, torch.Tensor)):
            return
        seen.add(id(obj))
        if isinstance(obj, FeatureCapture):
            if any(id(module) in old_modules for module in obj.modules.values()):
                obj.modules = {path: resolve_module(new, path) for path in obj.layers}
            return
        attributes = getattr(obj, "__dict__", None)
        if isinstance(attributes, dict):
            for value in list(attributes.values()):
                visit(value, depth + 1)

    visit(root, 0)


def replace_network(
    engine: Any,
    new: nn.Module,
    evaluators: Iterable[Any] = (),
    save_dicts: Iterable[MutableMapping[str, Any]] = (),
) -> nn.Module:
    """Point a MONAI trainer (``engine.network``, ``engine.optimizer``), the given evaluators and checkpoint dicts,
    and the feature captures reachable from the trainer at ``new`` (see the module docs).

    Args:
        engine: a MONAI trainer with ``network`` and ``optimizer``.
        new: the new, unwrapped network (e.g. the pruned copy), on the old network's device.
        evaluators: engines whose ``network`` is the old network (wrapped or not).
        save_dicts: checkpoint dicts (e.g. ``CheckpointSaver.save_dict``) whose values may be the old network.

    Returns:
        The network now in ``engine.network`` (``new``, re-wrapped like the old one).
    """
    old = engine.network
    model = unwrap_network(old)
    wrapped = rewrap_like(old, new)
    replacement = {id(old): wrapped, id(model): new}
    engine.network = wrapped
    _rebuild_optimizer(engine.optimizer, model, new)
    for evaluator in evaluators:
        swapped = replacement.get(id(getattr(evaluator, "network", None)))
        if swapped is not None:
            evaluator.network = swapped
    for save_dict in save_dicts:
        for key, value in list(save_dict.items()):
            if id(value) in replacement:
                save_dict[key] = replacement[id(value)]
    _rebind_captures(engine, model, new)
    return wrapped
