"""The one LRP backend: layer-wise relevance propagation through zennit, made correct for MONAI DenseNet and ResNet
and this package's students, in 2D and 3D.

Explanations (:class:`~monai_kdx.explain.LRPAttribution`, relevance at the input), saliency losses (the same, with
``create_graph=True``) and pruning (:class:`~monai_kdx.pruning.LRPRelevance`, relevance at every layer's output)
all build their rules here, with :func:`lrp_composite`: one composite (:func:`make_composite`), the BatchNorm merge
and the residual canonizer below, applied in one place.

zennit supplies the rules (epsilon, z+, alpha-beta, flat, z-box, gamma) and composites (which rule goes to which
layer); this module supplies what zennit cannot know about MONAI networks:

* **BatchNorm.** A BatchNorm that consumes exactly one convolution's (or linear layer's) output, and nothing else
  consumes that output, is merged into it (zennit's ``NamedMergeBatchNorm``). The pairs are found from the autograd
  graph of one traced forward pass (:meth:`monai_kdx.networks.NetworkTrace.batchnorm_pairs`), not from module
  order: zennit's ``SequentialMergeBatchNorm`` pairs consecutive leaves and, on MONAI DenseNet, would merge a dense
  layer's ``norm1`` (which normalizes the *concatenation* of all previous features) into the previous layer's ``conv2``
  (a shape error at best, a wrong model at worst). In MONAI DenseNet the merged pairs are ``conv0→norm0`` and every
  dense layer's ``conv1→norm2``; the pre-activation BatchNorms (dense layers' ``norm1``, transitions' ``norm``,
  ``norm5``: BN→ReLU→Conv on a concatenation) cannot be merged into anything and keep zennit's ``Pass`` rule: their
  output relevance is handed to their input element-wise, which conserves relevance (the affine shift of the BN
  absorbs none). In MONAI ResNet every BatchNorm follows its convolution (``conv1→bn1``, ``conv2→bn2``, the
  downsample ``conv→bn``) and is merged.
* **Residual additions.** MONAI's ``ResNetBlock``/``ResNetBottleneck`` and the students'
  :class:`~monai_kdx.networks.students.ResidualBlock` add the shortcut with a plain ``+``. Relevance in zennit
  travels as the *gradient* between hooked layers, and autograd hands the full incoming gradient to both summands
  of ``+``: the relevance is copied, not split, and doubles at every block
  (measured: a one-block net returns exactly 2x the logit). A canonizer (:func:`residual_canonizer`)
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

from monai_kdx.networks import trace_network
from monai_kdx.networks.students import ResidualBlock

from .zennit_backend import import_zennit

__all__ = ["LRP_COMPOSITES", "lrp_composite", "make_composite", "residual_canonizer"]

#: Composite names accepted by :class:`LRPAttribution` (``composite=...``).
LRP_COMPOSITES = (
    "epsilon_plus_flat",
    "epsilon_alpha2_beta1_flat",
    "epsilon_gamma_box",
    "epsilon_plus",
    "epsilon_alpha2_beta1",
    "epsilon",
    "zplus",
)


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


def _student_residual_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """:class:`~monai_kdx.networks.students.ResidualBlock` with its addition routed through ``self.canonizer_sum``."""
    return self.act(self.canonizer_sum(torch.stack([x, self.body(x)], dim=-1)))


def residual_canonizer() -> Any:
    """A zennit canonizer that makes the residual additions of MONAI ``ResNetBlock`` and ``ResNetBottleneck`` and of
    the students' ``ResidualBlock`` (2D and 3D) split relevance proportionally instead of copying it (see the module
    docstring).

    Returns:
        a ``zennit.canonizers.AttributeCanonizer``; pass it in a composite's ``canonizers``.
    """
    zennit = import_zennit()
    from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck

    forwards = ((ResNetBottleneck, _bottleneck_forward), (ResNetBlock, _block_forward))
    forwards += ((ResidualBlock, _student_residual_forward),)

    def attributes(name: str, module: nn.Module) -> dict[str, Any] | None:
        forward = next((function for kind, function in forwards if isinstance(module, kind)), None)
        if forward is None:
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
    * ``zplus``: the z+ rule on every convolution and linear layer, the first included (positive contributions of
      positive inputs, negative weights of negative inputs, nothing to the bias): DL-Backtrace's proportional
      propagation ``R_i = Σ_j (z_ij⁺ / Σ_k z_kj⁺) R_j``, which conserves relevance layer to layer.

    All of them pass relevance unchanged through activations and unmerged BatchNorms and use the proportional
    ``Norm`` rule on average pooling and on the residual ``Sum`` of :func:`residual_canonizer`.

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
    if name in ("epsilon", "zplus"):
        rule = (
            zennit.rules.Epsilon(epsilon=epsilon, zero_params=zero_params)
            if name == "epsilon"
            else zennit.rules.ZPlus(stabilizer=stabilizer, zero_params=zero_params)
        )
        layer_map = composites.layer_map_base(stabilizer) + [(zennit.types.Linear, rule)]
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


def lrp_composite(
    network: nn.Module,
    example: torch.Tensor,
    name: str = "epsilon_plus_flat",
    *,
    merge_batchnorm: bool = True,
    canonizers: Sequence[Any] = (),
    **options: Any,
) -> Any:
    """The composite that explains ``network``: :func:`make_composite` with the BatchNorm merge (pairs traced on
    ``example``), the residual canonizer and any extra canonizers.

    Register it for a block with ``with composite.context(network):``; a backward pass from the logits then carries
    relevance as the gradient (read it at the input, or at any layer output captured *before* registering).

    Args:
        network: a 2D or 3D network.
        example: (B, C, *spatial) input, for tracing the BatchNorm pairs (first sample only).
        name: one of :data:`LRP_COMPOSITES`.
        merge_batchnorm: merge each (conv, BatchNorm) pair for the duration of the context (it swaps parameter
            values in place: not with a graph kept for later); otherwise every BatchNorm passes relevance through.
        canonizers: extra zennit canonizers for other architectures (applied after the built-in ones).
        options: :func:`make_composite`'s keyword arguments (``epsilon``, ``gamma``, ``stabilizer``, ``zero_bias``,
            ``low``, ``high``).
    """
    zennit = import_zennit()
    built: list[Any] = []
    if merge_batchnorm:
        pairs = trace_network(network, example).batchnorm_pairs()
        if pairs:
            built.append(zennit.canonizers.NamedMergeBatchNorm(pairs))
    return make_composite(name, canonizers=[*built, residual_canonizer(), *canonizers], **options)
