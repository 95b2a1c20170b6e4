"""One tracing probe of a network: one forward pass of one sample, every module call recorded (order, output
shape, the autograd nodes it produced and consumed), and the structural facts read from it.

Three things the capabilities need to know about an arbitrary CNN are read from the same trace:

- :meth:`NetworkTrace.stage_layers`: one layer per resolution stage (what hierarchical explanations, saliency
  losses and the pruning gate explain);
- :meth:`NetworkTrace.head`: the classifier head (never pruned);
- :meth:`NetworkTrace.batchnorm_pairs`: the (linear layer, BatchNorm) pairs that can be merged for LRP, found
  from the autograd graph rather than from module order (MONAI's DenseNet normalizes concatenations).

The probe runs in eval mode (every submodule's mode is restored), with gradients enabled only on the probe's own
input copy; no parameter gradient is computed, no hook outlives the call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .capture import unwrap_network
from .modes import restore_mode

__all__ = ["LayerCall", "NetworkTrace", "trace_network"]

_LINEAR = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass
class LayerCall:
    """One call of a submodule during the probe.

    Attributes:
        path: the module's dotted path.
        module: the module.
        output_shape: shape of the output when it is a tensor, else None.
        produced: the autograd node of the output tensor (None without one).
        consumed: the autograd node of the first input tensor (None without one).
    """

    path: str
    module: nn.Module
    output_shape: tuple[int, ...] | None
    produced: Any = field(default=None, repr=False)
    consumed: Any = field(default=None, repr=False)


@dataclass
class NetworkTrace:
    """What one probe forward pass saw: every submodule call in execution order and the number of consumers of
    every autograd node reachable from the output.

    Attributes:
        network: the traced (unwrapped) network.
        input_ndim: dimensions of the probe input (B, C, *spatial).
        calls: every submodule call, in the order the calls returned (a module called twice appears twice).
        consumers: autograd node → how many nodes use its output.
        prefix: ``"module."`` when the traced network was wrapped in DDP/DataParallel (paths returned by the
            methods below carry it, so they resolve on the wrapper).
    """

    network: nn.Module
    input_ndim: int
    calls: list[LayerCall]
    consumers: dict[Any, int]
    prefix: str = ""

    def call_counts(self) -> dict[str, int]:
        """Module path → number of calls."""
        counts: dict[str, int] = {}
        for call in self.calls:
            counts[call.path] = counts.get(call.path, 0) + 1
        return counts

    def stage_layers(self, min_size: int = 2) -> list[str]:
        """One layer per stage, shallow to deep, each with a usable resolution for the traced input size.

        The stage container is the module whose convolution-holding children produce feature maps at the most
        distinct spatial resolutions (``features`` of a MONAI DenseNet, the network itself for a MONAI ResNet,
        ``blocks`` of :class:`~monai_kdx.networks.ShallowCNN`). Of its children, the last one at each resolution is
        a stage; a bare convolution stem is dropped when at least two stages remain. Stages whose maps are smaller
        than ``min_size`` along an axis are left out (a DenseNet121 on 32³ inputs: ``denseblock4`` gives 1³, a
        constant map).

        Args:
            min_size: the smallest usable map side.

        Raises:
            ValueError: the network has no convolution stages, or none with a usable resolution (the input is too
                small; the message names the stages and their map sizes).
        """
        root = self.network
        resolution: dict[str, tuple[int, ...]] = {}
        position: dict[str, int] = {}
        for index, call in enumerate(self.calls):
            if call.output_shape is not None and len(call.output_shape) == self.input_ndim:
                resolution[call.path] = call.output_shape[2:]
                position[call.path] = index  # last execution of each module
        best: list[str] = []
        for container_name, container in [("", root), *((n, m) for n, m in root.named_modules() if n)]:
            prefix = f"{container_name}." if container_name else ""
            children = [
                f"{prefix}{child}"
                for child, module in container.named_children()
                if _conv_count(module) and f"{prefix}{child}" in resolution
            ]
            children.sort(key=position.__getitem__)
            stages: list[str] = []
            for name in children:
                if stages and resolution[stages[-1]] == resolution[name]:
                    stages[-1] = name
                else:
                    stages.append(name)
            if len(stages) > len(best):
                best = stages
        if len(best) > 2 and isinstance(root.get_submodule(best[0]), nn.modules.conv._ConvNd):
            best = best[1:]
        if not best:
            raise ValueError(f"{type(root).__name__} has no convolution stages to explain; pass layers explicitly.")
        usable = [name for name in best if min(resolution[name]) >= min_size]
        if not usable:
            sizes = {name: resolution[name] for name in best}
            raise ValueError(
                f"every stage of {type(root).__name__} gives maps smaller than {min_size} per axis for this input "
                f"({sizes}): use a larger input or pass a shallower layer explicitly."
            )
        return [f"{self.prefix}{name}" for name in usable]

    def head(self) -> str:
        """Path of the classifier head: the linear layer (or, without one, the convolution) that runs last.

        Raises:
            ValueError: the network has no convolution or linear layer.
        """
        order = [call for call in self.calls if isinstance(call.module, _LINEAR)]
        linears = [call.path for call in order if isinstance(call.module, nn.Linear)]
        if linears:
            return f"{self.prefix}{linears[-1]}"
        if order:
            return f"{self.prefix}{order[-1].path}"
        raise ValueError(f"{type(self.network).__name__} has no Conv1d/2d/3d or Linear layer.")

    def batchnorm_pairs(self) -> list[tuple[tuple[str], str]]:
        """The (linear layer, BatchNorm) pairs that can be merged without changing the network's function.

        A pair qualifies when the BatchNorm's input is the very tensor produced by a convolution or linear layer,
        that tensor feeds nothing else (one consumer in the autograd graph), both modules run exactly once, and the
        BatchNorm has affine parameters and running statistics.

        Returns:
            ``[((linear_path,), batchnorm_path), ...]`` in the format of zennit's ``NamedMergeBatchNorm``.
        """
        counts = self.call_counts()
        produced = {
            call.produced: call.path
            for call in self.calls
            if isinstance(call.module, _LINEAR) and call.produced is not None and counts[call.path] == 1
        }
        pairs = []
        for call in self.calls:
            module = call.module
            if not (
                isinstance(module, nn.modules.batchnorm._BatchNorm)
                and module.affine
                and module.running_mean is not None
                and counts[call.path] == 1
            ):
                continue
            linear = produced.get(call.consumed)
            if linear is not None and self.consumers.get(call.consumed) == 1:
                pairs.append(((f"{self.prefix}{linear}",), f"{self.prefix}{call.path}"))
        return pairs


def _conv_count(module: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())


def _first_tensor(values: Any) -> torch.Tensor | None:
    if isinstance(values, torch.Tensor):
        return values
    if isinstance(values, (tuple, list)) and values and isinstance(values[0], torch.Tensor):
        return values[0]
    return None


def trace_network(network: nn.Module, example: torch.Tensor) -> NetworkTrace:
    """Run the first sample of ``example`` through ``network`` once and record every submodule call.

    Args:
        network: a 2D or 3D network (a DDP/DataParallel wrapper is unwrapped).
        example: (B, C, *spatial) input; only ``example[:1]`` is used.

    Returns:
        The :class:`NetworkTrace`.
    """
    root = unwrap_network(network)
    names = {module: name for name, module in root.named_modules() if name}
    calls: list[LayerCall] = []
    pending: dict[int, list[Any]] = {}

    def before(module: nn.Module, args: Any) -> None:
        tensor = _first_tensor(args)
        pending.setdefault(id(module), []).append(None if tensor is None else tensor.grad_fn)

    def after(module: nn.Module, args: Any, output: Any) -> None:
        consumed = pending[id(module)].pop() if pending.get(id(module)) else None
        tensor = output if isinstance(output, torch.Tensor) else None
        shape = tuple(tensor.shape) if tensor is not None else None
        calls.append(LayerCall(names[module], module, shape, getattr(tensor, "grad_fn", None), consumed))

    handles = []
    try:
        for module in names:
            handles.append(module.register_forward_pre_hook(before))
            handles.append(module.register_forward_hook(after))
        with torch.enable_grad(), restore_mode(root, training=False):
            output = root(example[:1].detach().requires_grad_(True))
    finally:
        for handle in handles:
            handle.remove()
    consumers: dict[Any, int] = {}
    start = getattr(_first_tensor(output), "grad_fn", None)
    stack = [start] if start is not None else []
    seen = {id(node) for node in stack}
    while stack:
        node = stack.pop()
        for parent, _ in node.next_functions:
            if parent is None:
                continue
            consumers[parent] = consumers.get(parent, 0) + 1
            if id(parent) not in seen:
                seen.add(id(parent))
                stack.append(parent)
    return NetworkTrace(root, example.ndim, calls, consumers, "module." if root is not network else "")
