"""Layer-wise relevance propagation (LRP) through zennit, made correct for MONAI DenseNet and ResNet in 2D and 3D.

zennit supplies the rules (epsilon, z+, alpha-beta, flat, z-box, gamma) and composites (which rule goes to which
layer); this module supplies what zennit cannot know about MONAI networks:

* **BatchNorm.** A BatchNorm that consumes exactly one convolution's (or linear layer's) output, and nothing else
  consumes that output, is merged into it (zennit's ``NamedMergeBatchNorm``). The pairs are found from the autograd
  graph of one traced forward pass (:func:`find_batchnorm_pairs`), not from module order: zennit's
  ``SequentialMergeBatchNorm`` pairs consecutive leaves and, on MONAI DenseNet, would merge a dense layer's
  ``norm1`` (which normalizes the *concatenation* of all previous features) into the previous layer's ``conv2``
  (a shape error at best, a wrong model at worst). In MONAI DenseNet the merged pairs are ``conv0→norm0`` and every
  dense layer's ``conv1→norm2``; the pre-activation BatchNorms (dense layers' ``norm1``, transitions' ``norm``,
  ``norm5``: BN→ReLU→Conv on a concatenation) cannot be merged into anything and keep zennit's ``Pass`` rule: their
  output relevance is handed to their input element-wise, which conserves relevance (the affine shift of the BN
  absorbs none). In MONAI ResNet every BatchNorm follows its convolution (``conv1→bn1``, ``conv2→bn2``, the
  downsample ``conv→bn``) and is merged.
* **Residual additions.** MONAI's ``ResNetBlock``/``ResNetBottleneck`` add the shortcut with a plain ``out +=
  residual``. Relevance in zennit travels as the *gradient* between hooked layers, and autograd hands the full
  incoming gradient to both summands of ``+``: the relevance is copied, not split, and doubles at every block
  (measured: a one-block net returns exactly 2x the logit). A canonizer (:func:`monai_resnet_canonizer`)
  temporarily replaces those blocks' ``forward`` by one that adds through a zennit ``Sum`` module, on which every
  composite puts the ``Norm`` rule: relevance is split between the branch and the shortcut in proportion to their
  contributions ``R_k = x_k / (x_branch + x_shortcut) * R``, which conserves it.

The registered explainer is :class:`monai_kdx.explain.attribution.LRPAttribution` (``"lrp"``); this module holds
the zennit-specific parts. Everything is undone after the call: the canonizers restore the original parameters and
``forward`` methods, and zennit's hooks are removed, also when the call fails.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .zennit_backend import import_zennit

__all__ = ["LRP_COMPOSITES", "find_batchnorm_pairs", "make_composite", "monai_resnet_canonizer"]

#: Composite names accepted by :class:`LRPAttribution` (``composite=...``).
LRP_COMPOSITES = (
    "epsilon_plus_flat",
    "epsilon_alpha2_beta1_flat",
    "epsilon_gamma_box",
    "epsilon_plus",
    "epsilon_alpha2_beta1",
    "epsilon",
)

_LINEAR = (nn.modules.conv._ConvNd, nn.Linear)


def find_batchnorm_pairs(network: nn.Module, inputs: torch.Tensor) -> list[tuple[tuple[str], str]]:
    """Find the (linear layer, BatchNorm) pairs that can be merged without changing the network's function.

    A pair qualifies when the BatchNorm's input is the very tensor produced by a convolution or linear layer, that
    tensor feeds nothing else (one consumer in the autograd graph), both modules run exactly once per forward pass,
    and the BatchNorm has affine parameters and running statistics. One traced forward pass on the first sample.

    Args:
        network: a 2D or 3D network (in the mode it will be explained in, normally eval).
        inputs: (B, C, H, W) or (B, C, H, W, D); only ``inputs[:1]`` is used.

    Returns:
        ``[((linear_path,), batchnorm_path), ...]`` in the format of zennit's ``NamedMergeBatchNorm``, with module
        paths relative to ``network``.
    """
    modules = dict(network.named_modules())
    linears = {id(m): name for name, m in modules.items() if isinstance(m, _LINEAR)}
    norms = {
        id(m): name
        for name, m in modules.items()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and m.running_mean is not None
    }
    produced: dict[str, Any] = {}
    consumed: dict[str, Any] = {}
    calls: dict[str, int] = {}

    def after_linear(module: nn.Module, args: Any, output: Any) -> None:
        name = linears[id(module)]
        calls[name] = calls.get(name, 0) + 1
        if isinstance(output, torch.Tensor):
            produced[name] = output.grad_fn

    def before_norm(module: nn.Module, args: Any) -> None:
        name = norms[id(module)]
        calls[name] = calls.get(name, 0) + 1
        if args and isinstance(args[0], torch.Tensor):
            consumed[name] = args[0].grad_fn

    handles = [modules[name].register_forward_hook(after_linear) for name in linears.values()]
    handles += [modules[name].register_forward_pre_hook(before_norm) for name in norms.values()]
    try:
        with torch.enable_grad():
            output = network(inputs[:1].detach().requires_grad_(True))
    finally:
        for handle in handles:
            handle.remove()
    # count the consumers of every autograd node reachable from the output
    consumers: dict[Any, int] = {}
    stack = [output.grad_fn] if getattr(output, "grad_fn", None) is not None else []
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
    by_node = {node: name for name, node in produced.items() if node is not None and calls.get(name) == 1}
    pairs = []
    for norm_name, node in consumed.items():
        linear_name = by_node.get(node)
        if linear_name is not None and calls.get(norm_name) == 1 and consumers.get(node) == 1:
            pairs.append(((linear_name,), norm_name))
    return pairs


def _block_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """MONAI ``ResNetBlock.forward`` with the residual addition routed through ``self.canonizer_sum``."""
    out = self.act(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    residual = x if self.downsample is None else self.downsample(x)
    return self.act(self.canonizer_sum(torch.stack([out, residual], dim=-1)))


def _bottleneck_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """MONAI ``ResNetBottleneck.forward`` with the residual addition routed through ``self.canonizer_sum``."""
    out = self.act(self.bn1(self.conv1(x)))
    out = self.act(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    residual = x if self.downsample is None else self.downsample(x)
    return self.act(self.canonizer_sum(torch.stack([out, residual], dim=-1)))


def monai_resnet_canonizer() -> Any:
    """A zennit canonizer that makes the residual additions of MONAI ``ResNetBlock`` and ``ResNetBottleneck``
    (2D and 3D) split relevance proportionally instead of copying it (see the module docstring).

    Returns:
        a ``zennit.canonizers.AttributeCanonizer``; pass it in a composite's ``canonizers``.
    """
    zennit = import_zennit()
    from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck

    def attributes(name: str, module: nn.Module) -> dict[str, Any] | None:
        if isinstance(module, ResNetBottleneck):
            forward = _bottleneck_forward
        elif isinstance(module, ResNetBlock):
            forward = _block_forward
        else:
            return None
        return {"forward": types.MethodType(forward, module), "canonizer_sum": zennit.layer.Sum(dim=-1)}

    return zennit.canonizers.AttributeCanonizer(attributes)


def make_composite(
    name: str,
    *,
    epsilon: float = 1e-6,
    gamma: float = 0.25,
    stabilizer: float = 1e-6,
    zero_bias: bool = False,
    low: float | torch.Tensor | None = None,
    high: float | torch.Tensor | None = None,
    canonizers: Sequence[Any] = (),
) -> Any:
    """Build the zennit composite ``name`` (one of :data:`LRP_COMPOSITES`).

    * ``epsilon_plus_flat``: flat rule on the first convolution, z+ on the other convolutions, epsilon on linear
      layers (zennit's recommendation for CNNs).
    * ``epsilon_alpha2_beta1_flat``: as above with alpha=2, beta=1 instead of z+ (not conservative where a neuron has
      no negative contributions: the alpha part alone then passes 2x its relevance).
    * ``epsilon_gamma_box``: z-box on the first convolution (needs the input's lowest/highest values ``low``/``high``),
      gamma rule on the other convolutions, epsilon on linear layers.
    * ``epsilon_plus``, ``epsilon_alpha2_beta1``: without the special first layer.
    * ``epsilon``: the epsilon rule on every convolution and linear layer (for bias-free ReLU networks this equals
      gradient x input; the reference for conservation checks).

    All of them pass relevance unchanged through activations and unmerged BatchNorms and use the proportional
    ``Norm`` rule on average pooling and on the residual ``Sum`` of :func:`monai_resnet_canonizer`.

    Args:
        name: composite name.
        epsilon: stabilizer of the epsilon rule (larger absorbs more relevance for weak activations).
        gamma: gamma of the gamma rule.
        stabilizer: stabilizer of the other rules.
        zero_bias: leave biases out of every rule (relevance is then conserved exactly, layer by layer, even where
            BatchNorms were merged into biases).
        low: lowest possible input value for ``epsilon_gamma_box``: float or tensor broadcastable to the input
            (B or 1, C or 1, *spatial or 1s).
        high: highest possible input value for ``epsilon_gamma_box``, same forms as ``low``.
        canonizers: zennit canonizers applied while the composite is registered.

    Raises:
        ValueError: unknown composite name (the valid ones are listed), or ``epsilon_gamma_box`` without bounds.
    """
    if name not in LRP_COMPOSITES:
        raise ValueError(f"unknown LRP composite {name!r}; valid composites: {list(LRP_COMPOSITES)}.")
    zennit = import_zennit()
    composites = zennit.composites
    zero_params = ["bias"] if zero_bias else None
    common = {"stabilizer": stabilizer, "zero_params": zero_params, "canonizers": list(canonizers)}
    if name == "epsilon":
        layer_map = composites.layer_map_base(stabilizer) + [
            (zennit.types.Linear, zennit.rules.Epsilon(epsilon=epsilon, zero_params=zero_params))
        ]
        return composites.LayerMapComposite(layer_map=layer_map, canonizers=list(canonizers))
    if name == "epsilon_gamma_box":
        if low is None or high is None:
            raise ValueError("the 'epsilon_gamma_box' composite needs the input bounds low and high.")
        return composites.EpsilonGammaBox(low=low, high=high, epsilon=epsilon, gamma=gamma, **common)
    cls = {
        "epsilon_plus_flat": composites.EpsilonPlusFlat,
        "epsilon_alpha2_beta1_flat": composites.EpsilonAlpha2Beta1Flat,
        "epsilon_plus": composites.EpsilonPlus,
        "epsilon_alpha2_beta1": composites.EpsilonAlpha2Beta1,
    }[name]
    return cls(epsilon=epsilon, **common)
