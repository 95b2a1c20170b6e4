"""Explanation dictionary transforms: maps written under new keys as ``MetaTensor`` with the input's
metadata (affine, filename, applied operations), so ``SaveImaged`` writes NIfTI heatmaps that overlay
exactly on the input volume and ``Invertd`` can map them back to the original space.

Both transforms take one sample (channel first, no batch dimension), as MONAI dictionary transforms
do: image (C, H, W) or (C, H, W, D).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from torch import nn

from monai_kdx.explain.base import build_explainer
from monai_kdx.explain.cam import HierarchicalCAM

__all__ = ["HierarchicalExplanationd", "Attributiond", "as_meta_like"]


def as_meta_like(values: torch.Tensor, reference: Any) -> MetaTensor:
    """``values`` (C', *spatial) as a MetaTensor carrying a copy of ``reference``'s metadata (affine,
    filename, applied operations) when it has any."""
    values = values.detach().cpu()
    if isinstance(reference, MetaTensor):
        out = MetaTensor(values, affine=reference.affine.clone(), meta=dict(reference.meta))
        out.applied_operations = list(reference.applied_operations)
        return out
    return MetaTensor(values)


def _sample_target(data: Mapping[Hashable, Any], target_key: str | None, class_idx: int | None) -> int | None:
    if target_key is None:
        return class_idx
    if target_key not in data:
        raise KeyError(f"target_key {target_key!r} is not in the data (keys: {sorted(map(str, data))}).")
    return int(torch.as_tensor(data[target_key]).reshape(-1)[0])


class _ExplanationTransform(MapTransform):
    """Shared plumbing: one explanation per key, batch dimension added and removed, device handling."""

    def __init__(
        self,
        keys: KeysCollection,
        network: nn.Module,
        output_key: str,
        target_key: str | None,
        class_idx: int | None,
        device: str | torch.device | None,
        allow_missing_keys: bool,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not isinstance(network, nn.Module):
            raise TypeError(f"network must be a torch.nn.Module, got {type(network).__name__}.")
        if len(self.keys) > 1 and output_key and not output_key.startswith("{key}"):
            output_key = "{key}_" + output_key
        self.network = network
        self.output_key = output_key
        self.target_key = target_key
        self.class_idx = class_idx
        self.device = torch.device(device) if device is not None else None

    def _batch(self, image: Any) -> torch.Tensor:
        tensor = torch.as_tensor(image).float().unsqueeze(0)
        return tensor.to(self.device) if self.device is not None else tensor

    def _out(self, key: Hashable, suffix: str = "") -> str:
        return self.output_key.format(key=key) + suffix

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        target = _sample_target(d, self.target_key, self.class_idx)
        for key in self.key_iterator(d):
            self._explain(d, key, target)
        return d

    def _explain(self, d: dict[Hashable, Any], key: Hashable, target: int | None) -> None:
        raise NotImplementedError


class HierarchicalExplanationd(_ExplanationTransform):
    """Hierarchical class activation maps of one sample at several layers (one forward + one backward).

    Writes ``d[output_key]``: the fused map (1, *spatial), ``d[output_key + "_levels"]``: every level
    stacked as channels (L, *spatial), shallow to deep (its meta holds ``"levels"``, the layer paths),
    and ``d[output_key + "_class"]``: the explained class. Both maps are MetaTensors with the input's
    metadata, in [0, 1].

    Args:
        keys: the image key(s); each image is (C, H, W) or (C, H, W, D).
        network: the classifier to explain (kept in eval mode during the call, its mode restored).
        layers: module paths; None picks one layer per stage (see :func:`monai_kdx.explain.stage_layers`).
        mode: ``"gradcam"``, ``"gradcam++"``, ``"layercam"`` or ``"activation"``.
        fusion: ``"mean"``, ``"max"`` or ``"product"``.
        output_key: where the fused map goes (``"{key}_cam"`` with several keys).
        target_key: a key holding the class to explain (e.g. ``"label"``); None: ``class_idx``.
        class_idx: the class to explain when ``target_key`` is None; None: the predicted class.
        device: where to run the network (the maps come back on the CPU).
        allow_missing_keys: skip missing image keys instead of raising.

    Example (bundle YAML):
        - _target_: monai_kdx.transforms.HierarchicalExplanationd
          keys: image
          network: "@network"
          mode: gradcam++
          target_key: label
    """

    def __init__(
        self,
        keys: KeysCollection,
        network: nn.Module,
        layers: Sequence[str] | None = None,
        mode: str = "gradcam",
        fusion: str = "mean",
        output_key: str = "cam",
        target_key: str | None = None,
        class_idx: int | None = None,
        device: str | torch.device | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, network, output_key, target_key, class_idx, device, allow_missing_keys)
        self.explainer = HierarchicalCAM(network, layers, mode=mode, fusion=fusion)

    def _explain(self, d: dict[Hashable, Any], key: Hashable, target: int | None) -> None:
        image = d[key]
        result = self.explainer.cam(self._batch(image), target)
        levels = torch.cat(list(result.values()), dim=1)[0]
        d[self._out(key)] = as_meta_like(result.fused[0], image)
        d[self._out(key, "_levels")] = as_meta_like(levels, image)
        d[self._out(key, "_levels")].meta["levels"] = list(result)
        d[self._out(key, "_class")] = int(result.targets[0])


class Attributiond(_ExplanationTransform):
    """A pixel attribution (any method registered in ``EXPLAINERS``: ``"integrated_gradients"``,
    ``"occlusion"``, ``"lrp"``, the CAM modes, plugins) of one sample, written as a MetaTensor
    (1, *spatial) with the input's metadata under ``output_key``.

    Args:
        keys: the image key(s); each image is (C, H, W) or (C, H, W, D).
        network: the classifier to explain.
        method: the registered explainer name.
        output_key: where the map goes (``"{key}_attribution"`` with several keys).
        target_key: a key holding the class to explain (e.g. ``"label"``); None: ``class_idx``.
        class_idx: the class to explain when ``target_key`` is None; None: the predicted class.
        device: where to run the network (the map comes back on the CPU).
        allow_missing_keys: skip missing image keys instead of raising.
        options: the explainer's own options (e.g. ``n_steps`` for integrated gradients).
    """

    def __init__(
        self,
        keys: KeysCollection,
        network: nn.Module,
        method: str = "integrated_gradients",
        output_key: str = "attribution",
        target_key: str | None = None,
        class_idx: int | None = None,
        device: str | torch.device | None = None,
        allow_missing_keys: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(keys, network, output_key, target_key, class_idx, device, allow_missing_keys)
        self.method = method
        self.explainer = build_explainer(method, network, **options)

    def _explain(self, d: dict[Hashable, Any], key: Hashable, target: int | None) -> None:
        image = d[key]
        attribution = self.explainer.attribute(self._batch(image), target)
        d[self._out(key)] = as_meta_like(attribution[0], image)
