"""Structural pruning by relevance with Torch-Pruning's dependency graph.

Channels are physically removed (smaller weight tensors, fewer MACs), not masked. Torch-Pruning's
dependency graph keeps coupled layers consistent: the convolutions feeding a DenseNet concatenation
and the layers reading it, the convolutions added by a ResNet residual, the batch norms in between.
The classifier head (the last linear, or last convolution, the network runs) is never pruned.

Everything is validated, and the pruning is done on a deep copy: on any error the caller's network
is untouched, and on success the caller's network is unchanged as well (the pruned copy is returned).
Pruning creates new parameters: build a new optimizer (and DDP wrapper) around the returned network.
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from monai_kdx.networks import (
    as_plain_tensor,
    check_network_input,
    check_network_spec,
    device_of,
    resolve_module,
    restore_mode,
    set_network_spec,
    split_batch,
    trace_network,
    unwrap_network,
)

from .relevance import _is_iterator, collect_relevance, prunable_layers, resolve_relevance_method

__all__ = ["RelevanceImportance", "check_prunable", "check_ratio", "prune_by_relevance", "find_head"]


class RelevanceImportance(tp.importance.Importance):
    """Torch-Pruning importance (``tp.importance.Importance``) reading precomputed channel relevances.

    For a dependency group (the layers whose channels must be removed together), the score of each of the group's
    channels is the sum (``group_reduction="sum"``) or mean of the relevances of every convolution/linear layer in the
    group whose *output* channels are pruned (e.g. a ResNet block's last convolution and the convolution on the
    shortcut). Layers without a relevance entry are skipped; a group with no scored layer gets no score and is not
    pruned.

    Args:
        relevance: layer path → relevance (C_out,) for the network's current channels (see
            :func:`~monai_kdx.pruning.collect_relevance`).
        network: the network being pruned (paths are resolved against it).
        group_reduction: ``"sum"`` or ``"mean"`` over the group's scored layers.
        normalizer: None, or ``"mean"``/``"max"``/``"sum"``: divide each layer's relevance by its mean/max/sum before
            the reduction (makes layers of different scales comparable in global pruning).

    Example:
        >>> imp = RelevanceImportance(collect_relevance(net, loader, "lrp"), net)
        >>> pruner = tp.pruner.MetaPruner(net, example_inputs, imp, pruning_ratio=0.5)
    """

    def __init__(
        self,
        relevance: Mapping[str, torch.Tensor],
        network: nn.Module,
        group_reduction: str = "sum",
        normalizer: str | None = None,
    ) -> None:
        if group_reduction not in ("sum", "mean"):
            raise ValueError(f"group_reduction must be 'sum' or 'mean', got {group_reduction!r}.")
        if normalizer not in (None, "mean", "max", "sum"):
            raise ValueError(f"normalizer must be None, 'mean', 'max' or 'sum', got {normalizer!r}.")
        self.group_reduction = group_reduction
        self.normalizer = normalizer
        self.paths = {module: path for path, module in unwrap_network(network).named_modules()}
        self.update(relevance)

    def update(self, relevance: Mapping[str, torch.Tensor]) -> None:
        """Replace the relevance (e.g. recomputed between iterative pruning steps)."""
        scores = {}
        for path, value in relevance.items():
            value = torch.as_tensor(value).detach().double().cpu()
            if value.ndim == 2:  # per-class relevance: all classes together
                value = value.sum(0)
            if self.normalizer is not None:
                scale = {"mean": value.mean(), "max": value.max(), "sum": value.sum()}[self.normalizer]
                value = value / scale if scale > 0 else value
            scores[path] = value
        self.relevance = scores

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor | None:
        function = tp.pruner.function
        out_fns = (function.prune_conv_out_channels, function.prune_linear_out_channels)
        total: torch.Tensor | None = None
        count = 0
        for i, (dep, idxs) in enumerate(group):
            layer = dep.target.module
            if dep.handler not in out_fns:
                continue
            path = self.paths.get(layer)
            if path is None or path not in self.relevance:
                continue
            root_idxs = group[i].root_idxs
            if any(index is None for index in root_idxs):
                continue
            scores = self.relevance[path]
            if len(scores) != _out_width(layer):
                raise ValueError(
                    f"relevance of layer {path!r} has {len(scores)} entries but the layer has {_out_width(layer)} "
                    "output channels: recompute the relevance on the current network."
                )
            if total is None:
                total = torch.zeros(len(group[0][1]), dtype=torch.float64)
            total.scatter_add_(0, torch.as_tensor(root_idxs, dtype=torch.long), scores[list(idxs)])
            count += 1
        if total is not None and self.group_reduction == "mean":
            total /= count
        return total


def _out_width(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _is_conv_or_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.conv._ConvNd, nn.Linear))


def find_head(network: nn.Module, example_inputs: torch.Tensor) -> str:
    """Path of the classifier head: the linear layer (or, without one, the convolution) that runs last (see
    :meth:`monai_kdx.networks.NetworkTrace.head`).

    Args:
        network: the model (run once on the first sample of ``example_inputs`` in eval mode; modes restored).
        example_inputs: e.g. (1, C_in, H, W) or (1, C_in, H, W, D).

    Raises:
        ValueError: the network has no convolution or linear layer ("nothing to prune").
    """
    try:
        return trace_network(unwrap_network(network), example_inputs).head()
    except ValueError as error:
        raise ValueError(f"{error} Nothing to prune.") from None


def _residual_unet_layer(model: nn.Module) -> str | None:
    """Path of the first residual unit of a MONAI ``UNet`` with ``num_res_units > 0`` inside ``model``."""
    try:
        from monai.networks.blocks import ResidualUnit
        from monai.networks.nets import UNet
    except ImportError:  # pragma: no cover - monai is a dependency
        return None
    for path, module in model.named_modules():
        if isinstance(module, UNet) and getattr(module, "num_res_units", 0) > 0:
            for sub_path, sub in module.named_modules():
                if isinstance(sub, ResidualUnit):
                    return ".".join(p for p in (path, sub_path) if p)
            return path or type(module).__name__
    return None


def _failing_layers(error: BaseException, model: nn.Module) -> list[str]:
    """Module paths around the graph node where Torch-Pruning failed (read from the traceback's ``node`` locals)."""
    names = {id(module): path for path, module in model.named_modules()}
    found: list[str] = []
    tb = error.__traceback__
    while tb is not None:
        node = tb.tb_frame.f_locals.get("node")
        if node is not None and hasattr(node, "inputs"):
            candidates = [node, *list(getattr(node, "inputs", []))]
            found = [names[id(c.module)] for c in candidates if id(getattr(c, "module", None)) in names]
            if not found:
                found = [str(getattr(node, "name", node))]
        tb = tb.tb_next
    return found


def _unsupported(model: nn.Module, error: BaseException) -> ValueError:
    layers = _failing_layers(error, model)
    where = f" at layer(s) {layers}" if layers else ""
    return ValueError(
        f"{type(model).__name__} is not supported by Torch-Pruning's dependency graph{where}: "
        f"{type(error).__name__}: {error}. The network was not changed."
    )


def _build_graph(model: nn.Module, example_inputs: torch.Tensor):
    """Torch-Pruning's dependency graph of ``model`` (a copy), or a ValueError naming the layer that breaks it."""
    unet = _residual_unet_layer(model)
    if unet is not None:
        raise ValueError(
            f"MONAI UNet with residual units is not supported by Torch-Pruning's dependency graph (layer {unet!r}, "
            "a ResidualUnit; its concatenated skip connections cannot be traced). The network was not changed."
        )
    try:
        with restore_mode(model):
            return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    except Exception as error:
        raise _unsupported(model, error) from error


def _resolve_ignored(model: nn.Module, ignored_layers: Iterable[Any] | None) -> list[str]:
    if ignored_layers is None:
        return []
    if isinstance(ignored_layers, (str, nn.Module)):
        ignored_layers = [ignored_layers]
    modules = dict(model.named_modules())
    paths = {module: path for path, module in modules.items()}
    result = []
    for item in ignored_layers:
        if isinstance(item, str):
            module = resolve_module(model, item)  # ValueError with close matches
            result.append(paths[module])
        elif isinstance(item, nn.Module):
            if item not in paths:
                raise ValueError(f"ignored layer {type(item).__name__} is not a submodule of {type(model).__name__}.")
            result.append(paths[item])
        else:
            raise TypeError(f"ignored_layers takes module paths or modules, got {type(item).__name__}.")
    return result


def check_ratio(ratio: Any, name: str = "ratio") -> float:
    """A pruning ratio (the fraction of channels removed) as a float in (0, 1), or an error naming ``name``.

    Raises:
        TypeError: not a real number.
        ValueError: outside (0, 1).
    """
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise TypeError(f"{name} must be a float in (0, 1), got {type(ratio).__name__}.")
    if not 0.0 < float(ratio) < 1.0:
        raise ValueError(f"{name} must be in (0, 1) (the fraction of channels removed), got {ratio}.")
    return float(ratio)


def _groups(graph: Any, ignored: list[nn.Module]) -> list[Any]:
    return list(
        graph.get_all_groups(
            ignored_layers=ignored, root_module_types=[tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR, tp.ops.TORCH_LSTM]
        )
    )


def _plan(
    model: nn.Module,
    example_inputs: torch.Tensor,
    ignored: list[str],
    ratio: float | Mapping[str, float] | None,
) -> tuple[str, list[str]]:
    """Trace ``model`` (a copy), find the head and the prunable groups, check the ratio; returns (head, root paths)."""
    graph = _build_graph(model, example_inputs)
    head = find_head(model, example_inputs)
    modules = dict(model.named_modules())
    paths = {module: path for path, module in modules.items()}
    roots = []
    for group in _groups(graph, [modules[path] for path in {*ignored, head}]):
        root = group[0].dep.target.module
        roots.append(paths[root])
        layer_ratio = _ratio_for(paths[root], ratio) if isinstance(ratio, Mapping) else ratio
        if layer_ratio is None:
            continue
        width = graph.get_out_channels(root)
        if width is not None and width > 1 and int(width * (1 - layer_ratio)) < 1:
            raise ValueError(
                f"ratio {layer_ratio} would leave layer {paths[root]!r} ({width} output channels) with no channels; "
                f"use a ratio below {1 - 1 / width:.3f} or add the layer to ignored_layers. "
                "The network was not changed."
            )
    return head, roots


def check_prunable(
    network: nn.Module,
    example_inputs: torch.Tensor,
    ignored_layers: Sequence[str | nn.Module] | None = None,
    ratio: float | Mapping[str, float] | None = None,
) -> list[str]:
    """Check that Torch-Pruning can prune ``network`` (on a deep copy; the network is not changed).

    Args:
        network: the model (DDP/DataParallel unwrapped).
        example_inputs: one input batch, e.g. (1, C_in, H, W) or (1, C_in, H, W, D).
        ignored_layers: module paths or modules never pruned (the classifier head is added automatically).
        ratio: if given, also check that no layer would be left without channels at this per-layer ratio (a float,
            or a mapping module path → ratio).

    Returns:
        Paths of the layers that root a prunable group (one per group of coupled channels), head excluded.

    Raises:
        ValueError: an unsupported network (MONAI UNet with residual units, or any model whose dependency graph cannot
            be traced; names the layer), a bad ratio, or a layer the ratio would empty (named).
    """
    if ratio is not None:
        ratio = (
            {str(k): check_ratio(v, f"ratio[{k!r}]") for k, v in ratio.items()}
            if isinstance(ratio, Mapping)
            else check_ratio(ratio)
        )
    model = copy.deepcopy(unwrap_network(network))
    example_inputs = as_plain_tensor(example_inputs).to(device_of(model))
    check_network_input(model, example_inputs, "example inputs")
    return _plan(model, example_inputs, _resolve_ignored(model, ignored_layers), ratio)[1]


def _ratio_for(path: str, ratios: Mapping[str, float]) -> float | None:
    """The ratio of the most specific key that is ``path`` or one of its parents."""
    best = None
    for key, value in ratios.items():
        if (path == key or path.startswith(key + ".")) and (best is None or len(key) > len(best[0])):
            best = (key, value)
    return None if best is None else best[1]


def prune_by_relevance(
    network: nn.Module,
    calibration_loader: Iterable[Any] | None,
    ratio: float | Mapping[str, float],
    method: str | Any = "lrp",
    example_inputs: torch.Tensor | None = None,
    ignored_layers: Sequence[str | nn.Module] | None = None,
    global_pruning: bool = False,
    iterative_steps: int = 1,
    relevance: Mapping[str, torch.Tensor] | None = None,
    target: str = "label",
    max_batches: int | None = None,
    normalizer: str | None = None,
    builder: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Remove the least relevant channels of a classifier; return the pruned network (a new module).

    Relevance is collected on ``calibration_loader`` with ``method`` (:func:`~monai_kdx.pruning.collect_relevance`),
    and Torch-Pruning removes, per dependency group, the channels with the lowest relevance (summed over the group's
    coupled layers, :class:`RelevanceImportance`). The caller's ``network`` is never modified: pruning works on a deep
    copy, after every argument is validated.

    Args:
        network: a classifier mapping (B, C_in, H, W) or (B, C_in, H, W, D) to logits (B, num_classes): MONAI
            DenseNet/ResNet families, :mod:`monai_kdx.networks` students, or any model Torch-Pruning can trace
            (DDP/DataParallel are unwrapped; the result is unwrapped — wrap it again).
        calibration_loader: MONAI dict batches (``"image"``, ``"label"``) or ``(image, label)`` pairs; must be
            re-iterable (a DataLoader or list, not a generator). May be None with ``relevance=`` or a data-free
            method, if ``example_inputs`` is given.
        ratio: fraction of channels removed, in (0, 1): a float for every layer (each layer loses this fraction, or
            with ``global_pruning`` the whole network does), or a mapping module path → ratio for some layers only
            (a path covers its submodules; other layers are kept).
        method: a relevance method registered in :data:`monai_kdx.registry.RELEVANCE_METHODS` (``"lrp"``, ``"ig"``,
            ``"taylor"``, ``"backtrace"``, ``"magnitude"``, ``"random"``) or a ``RelevanceMethod`` instance.
        example_inputs: one input for tracing the dependency graph; default: the first sample of the first batch.
        ignored_layers: module paths or modules never pruned; the classifier head is always added.
        global_pruning: rank channels across all layers (one threshold) instead of within each layer.
        iterative_steps: prune in this many steps of growing ratio, recollecting relevance before every step.
        relevance: precomputed layer path → relevance (C_out,); skips collection (only with ``iterative_steps=1``).
        target: explain the ``"label"`` (default) or the predicted class ``"pred"``.
        max_batches: use at most this many calibration batches per relevance collection.
        normalizer: per-layer normalization of relevance before ranking (see :class:`RelevanceImportance`).
        builder: the network spec (``{"network": <registered name>, **arguments}``) that builds the unpruned
            architecture, recorded on the pruned network for :func:`~monai_kdx.pruning.save_pruned`; default: the
            spec the network carries (networks from :func:`~monai_kdx.networks.build_network` do).

    Returns:
        The pruned network, in the same train/eval mode as ``network``; same output shape, fewer channels.

    Raises:
        TypeError: a network that is not an ``nn.Module``, a non-numeric ratio, an iterator as loader, a bad builder.
        ValueError: a ratio outside (0, 1) or one that would empty a layer (named), an empty loader, an unsupported
            network such as MONAI's UNet with residual units (the layer is named), bad relevance entries.
        KeyError: an unknown method (the registered ones are listed).
    """
    # ---- validate everything before any work on the network
    if not isinstance(network, nn.Module):
        raise TypeError(f"network must be an nn.Module, got {type(network).__name__}.")
    if isinstance(ratio, Mapping):
        if not ratio:
            raise ValueError("ratio mapping is empty.")
        ratios = {str(path): check_ratio(value, f"ratio[{path!r}]") for path, value in ratio.items()}
    else:
        ratios = check_ratio(ratio)
    if isinstance(iterative_steps, bool) or not isinstance(iterative_steps, int) or iterative_steps < 1:
        raise ValueError(f"iterative_steps must be an int >= 1, got {iterative_steps!r}.")
    if relevance is not None and iterative_steps > 1:
        raise ValueError("relevance= cannot be used with iterative_steps > 1: relevance is recomputed between steps.")
    scorer = resolve_relevance_method(method) if relevance is None else None  # KeyError lists the methods
    builder_spec = None if builder is None else check_network_spec(builder)
    model = unwrap_network(network)
    if isinstance(ratios, Mapping):
        for path in ratios:
            resolve_module(model, path)  # ValueError naming the path, with close matches
    needs_data = relevance is None and not getattr(scorer, "data_free", False)
    if calibration_loader is not None:
        if _is_iterator(calibration_loader):
            raise TypeError(
                "calibration_loader must be re-iterable (a DataLoader or a list of batches), not an iterator or "
                "generator: it is read once for the example input and again for relevance."
            )
        first = next(iter(calibration_loader), None)
        if first is None:
            raise ValueError("the calibration loader is empty: pruning by relevance needs at least one batch.")
        if example_inputs is None:
            example_inputs = as_plain_tensor(split_batch(first)[0])[:1]
            check_network_input(model, example_inputs, "calibration images")
    elif needs_data:
        raise ValueError(f"relevance method {method!r} needs a calibration loader, got None.")
    if example_inputs is None:
        raise ValueError("example_inputs is needed when no calibration loader is given.")
    check_network_input(model, as_plain_tensor(example_inputs).to(device_of(model)), "example inputs")

    # ---- from here on only the copy is touched
    pruned = copy.deepcopy(model)
    device = device_of(pruned)
    example_inputs = as_plain_tensor(example_inputs).to(device)
    ignored = _resolve_ignored(pruned, ignored_layers)
    # ValueError naming the layer for unsupported models and for layers the ratio would empty
    head, _ = _plan(pruned, example_inputs, ignored, ratios if not global_pruning else None)
    modules = dict(pruned.named_modules())
    layers = prunable_layers(pruned)
    if relevance is not None:
        relevance = _check_relevance(relevance, layers)
    with restore_mode(pruned), torch.no_grad():
        reference = pruned(example_inputs)

    if relevance is None:
        relevance = collect_relevance(pruned, calibration_loader, scorer, target=target, max_batches=max_batches)
    importance = RelevanceImportance(relevance, pruned, normalizer=normalizer)
    ignored_modules = [modules[path] for path in {*ignored, head}]
    kwargs: dict[str, Any] = {}
    if isinstance(ratios, Mapping):
        kwargs["pruning_ratio"] = 0.0
        kwargs["pruning_ratio_dict"] = {modules[path]: value for path, value in ratios.items()}
    else:
        kwargs["pruning_ratio"] = ratios
    with restore_mode(pruned):
        try:
            pruner = tp.pruner.MetaPruner(
                pruned,
                example_inputs,
                importance,
                global_pruning=global_pruning,
                iterative_steps=iterative_steps,
                ignored_layers=ignored_modules,
                **kwargs,
            )
        except Exception as error:
            raise _unsupported(pruned, error) from error
        for step in range(iterative_steps):
            if step > 0:
                importance.update(
                    collect_relevance(pruned, calibration_loader, scorer, target=target, max_batches=max_batches)
                )
            pruner.step()
    _check_result(pruned, example_inputs, reference, head)
    if builder_spec is not None:
        set_network_spec(pruned, builder_spec)
    return pruned


def _check_relevance(relevance: Mapping[str, torch.Tensor], layers: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    if not isinstance(relevance, Mapping):
        raise TypeError(f"relevance must be a dict layer path → (C_out,) tensor, got {type(relevance).__name__}.")
    unknown = sorted(set(relevance) - set(layers))
    if unknown:
        raise ValueError(f"relevance names layers that are not Conv/Linear layers of the network: {unknown[:5]}.")
    checked = {}
    for path, value in relevance.items():
        value = torch.as_tensor(value)
        width = _out_width(layers[path])
        if value.shape[-1] != width or value.ndim not in (1, 2):
            raise ValueError(
                f"relevance of layer {path!r} has shape {tuple(value.shape)}; expected ({width},) "
                f"or (num_classes, {width})."
            )
        if not torch.isfinite(value).all():
            raise ValueError(f"relevance of layer {path!r} is not finite.")
        checked[path] = value
    if not checked:
        raise ValueError("relevance is empty.")
    return checked


def _check_result(pruned: nn.Module, example_inputs: torch.Tensor, reference: torch.Tensor, head: str) -> None:
    for path, module in pruned.named_modules():
        if _is_conv_or_linear(module):
            width_in = module.in_features if isinstance(module, nn.Linear) else module.in_channels
            if _out_width(module) < 1 or width_in < 1:
                raise ValueError(
                    f"pruning left layer {path!r} without channels (global pruning removed all of them); use a "
                    "smaller ratio, per-layer pruning, or add the layer to ignored_layers. The network was not changed."
                )
    try:
        with restore_mode(pruned), torch.no_grad():
            output = pruned(example_inputs)
    except Exception as error:
        raise ValueError(
            f"{type(pruned).__name__} cannot be pruned consistently by Torch-Pruning (the pruned copy fails: "
            f"{type(error).__name__}: {error}); the network was not changed."
        ) from error
    if output.shape != reference.shape:
        raise ValueError(
            f"pruning changed the output shape from {tuple(reference.shape)} to {tuple(output.shape)} "
            f"(head {head!r}); the network was not changed."
        )
