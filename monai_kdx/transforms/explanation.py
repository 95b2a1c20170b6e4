"""Explanation dictionary transforms: maps written under new keys as ``MetaTensor`` with the input's
metadata (affine, filename, applied operations), so ``SaveImaged`` writes NIfTI heatmaps that overlay
exactly on the input volume and ``Invertd`` can map them back to the original space.

Both transforms take one sample (channel first, no batch dimension), as MONAI dictionary transforms
do: image (C, H, W) or (C, H, W, D).
"""

from __future__ import annotations

import numbers
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.networks.layers import GaussianFilter
from monai.transforms import MapTransform
from torch import nn

from monai_kdx.explain.activation import minmax_normalize
from monai_kdx.explain.base import build_explainer
from monai_kdx.explain.cam import CAM_MODES, HierarchicalCAM
from monai_kdx.networks import class_indices, resolve_targets, restore_mode

from .naming import case_name

__all__ = [
    "HierarchicalExplanationd",
    "Attributiond",
    "ExplanationFaithfulnessd",
    "ExplanationLocalizationd",
    "SaveExplanationFigured",
    "as_meta_like",
]


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
    return int(class_indices(data[target_key], 1, name=f"data[{target_key!r}]")[0])


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
    """Hierarchical class activation maps of one sample at several layers (one forward + one backward), or any
    other registered explanation method.

    Writes ``d[output_key]``: the fused map (1, *spatial), ``d[output_key + "_levels"]``: every level
    stacked as channels (L, *spatial), shallow to deep (its meta holds ``"levels"``, the layer paths),
    and ``d[output_key + "_class"]``: the explained class. Both maps are MetaTensors with the input's
    metadata, in [0, 1]. With a ``mode`` that is not a CAM mode (e.g. ``"integrated_gradients"``), the map is the
    min-max normalized magnitude of that method's attribution, smoothed by a Gaussian of ``smoothing`` voxels
    first, and its one level is itself.

    Args:
        keys: the image key(s); each image is (C, H, W) or (C, H, W, D).
        network: the classifier to explain (kept in eval mode during the call, its mode restored).
        layers: module paths; None picks one layer per stage (see :func:`monai_kdx.explain.stage_layers`).
        mode: ``"gradcam"``, ``"gradcam++"``, ``"layercam"``, ``"activation"``, or any explainer registered in
            :data:`monai_kdx.registry.EXPLAINERS` (``"integrated_gradients"``, ``"lrp"``, ...).
        fusion: ``"mean"``, ``"max"`` or ``"product"``.
        output_key: where the fused map goes (``"{key}_cam"`` with several keys).
        target_key: a key holding the class to explain (e.g. ``"label"``); None: ``class_idx``.
        class_idx: the class to explain when ``target_key`` is None; None: the predicted class.
        device: where to run the network (the maps come back on the CPU).
        allow_missing_keys: skip missing image keys instead of raising.
        smoothing: standard deviation in voxels of a Gaussian over a pixel attribution's magnitude (0: none).
            Per-voxel gradients are noisy ("shattered"): two networks that look at the same structure give maps
            that correlate only at the scale of that structure, and the highest voxel of a raw map is often a
            noise peak beside it. CAM maps, upsampled from coarse layers, are smooth already and are left as they
            are.

    Raises:
        ValueError: ``smoothing`` not a number in [0, 64).

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
        smoothing: float = 0.0,
    ) -> None:
        super().__init__(keys, network, output_key, target_key, class_idx, device, allow_missing_keys)
        if isinstance(smoothing, bool) or not isinstance(smoothing, numbers.Real) or not 0 <= smoothing < 64:
            raise ValueError(f"smoothing must be a number of voxels in [0, 64), got {smoothing!r}.")
        self.smoothing = float(smoothing)
        self.mode = mode
        self.explainer = (
            HierarchicalCAM(network, layers, mode=mode, fusion=fusion)
            if mode in CAM_MODES
            else build_explainer(mode, network)
        )

    def _explain(self, d: dict[Hashable, Any], key: Hashable, target: int | None) -> None:
        image = d[key]
        x = self._batch(image)
        if isinstance(self.explainer, HierarchicalCAM):
            result = self.explainer.cam(x, target)
            fused, levels, names, explained = (
                result.fused[0],
                torch.cat(list(result.values()), 1)[0],
                list(result),
                result.targets[0],
            )
        else:
            if target is None:
                with restore_mode(self.network), torch.no_grad():
                    explained = resolve_targets(None, self.network(x))
            else:
                explained = torch.tensor([target])
            magnitude = self.explainer.attribute(x, explained.reshape(-1)).abs()
            if self.smoothing:
                magnitude = GaussianFilter(x.ndim - 2, self.smoothing)(magnitude)
            fused = minmax_normalize(magnitude)[0]
            levels, names = fused, [self.mode]
        d[self._out(key)] = as_meta_like(fused, image)
        d[self._out(key, "_levels")] = as_meta_like(levels, image)
        d[self._out(key, "_levels")].meta["levels"] = names
        d[self._out(key, "_class")] = int(torch.as_tensor(explained).reshape(-1)[0])


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


class ExplanationFaithfulnessd(MapTransform):
    """Deletion and insertion AUC (:func:`monai_kdx.metrics.deletion_auc`, :func:`~monai_kdx.metrics.insertion_auc`)
    of an explanation map of one sample, written as scalars under ``"{key}_deletion_auc"`` and
    ``"{key}_insertion_auc"`` (lower deletion and higher insertion AUC: a more faithful map). With
    ``random_map=True`` the same areas of a uniform random map of the same image are written under
    ``"{key}_random_deletion_auc"`` and ``"{key}_random_insertion_auc"``: the reference a map must beat.

    Args:
        keys: the map key(s); each map is (1, *spatial).
        network: the explained classifier.
        image_key: the image (C, *spatial) the map explains.
        class_key: a key holding the explained class (e.g. ``"cam_class"`` from
            :class:`HierarchicalExplanationd`, or ``"label"``).
        steps: perturbation steps.
        device: where to run the network.
        baseline: what replaces removed positions: a number, or ``"blur"``, ``"noise"``, ``"road"`` (see
            :mod:`monai_kdx.metrics.faithfulness`).
        random_map: also score a uniform random map (seeded by ``seed``).
        seed: seed of the random map and of the ``"noise"``/``"road"`` baselines.
        max_samples: score only the first ``max_samples`` samples this transform sees (later ones get NaN, which
            :class:`monai_kdx.metrics.MeanMetric` skips): faithfulness costs ``2 · (steps + 1)`` forward passes per
            map, localization none. None: every sample.
    """

    def __init__(
        self,
        keys: KeysCollection,
        network: nn.Module,
        image_key: str = "image",
        class_key: str = "label",
        steps: int = 20,
        device: str | torch.device | None = None,
        baseline: float | str = 0.0,
        random_map: bool = False,
        seed: int = 0,
        max_samples: int | None = None,
    ) -> None:
        super().__init__(keys)
        from monai_kdx.metrics.faithfulness import BASELINES

        if isinstance(baseline, str) and baseline not in BASELINES:
            raise ValueError(f"baseline must be a number or one of {BASELINES}, got {baseline!r}.")
        self.network, self.image_key, self.class_key, self.steps = network, image_key, class_key, steps
        self.device = torch.device(device) if device is not None else None
        self.baseline, self.random_map, self.seed = baseline, bool(random_map), int(seed)
        if max_samples is not None and (isinstance(max_samples, bool) or int(max_samples) < 0):
            raise ValueError(f"max_samples must be None or an integer >= 0, got {max_samples!r}.")
        self.max_samples = max_samples
        self._seen = 0

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from monai_kdx.metrics import deletion_auc, insertion_auc

        d = dict(data)
        for name in (self.image_key, self.class_key):
            if name not in d:
                raise KeyError(f"{name!r} is not in the data (keys: {sorted(map(str, d))}).")
        self._seen += 1
        if self.max_samples is not None and self._seen > self.max_samples:
            suffixes = ("", "_random") if self.random_map else ("",)
            for key in self.key_iterator(d):
                for suffix in suffixes:
                    d[f"{key}{suffix}_deletion_auc"] = d[f"{key}{suffix}_insertion_auc"] = torch.tensor(float("nan"))
            return d
        image = torch.as_tensor(d[self.image_key]).float().unsqueeze(0)
        target = class_indices(d[self.class_key], 1, name=f"data[{self.class_key!r}]")
        if self.device is not None:
            image, target = image.to(self.device), target.to(self.device)
        for key in self.key_iterator(d):
            maps = {key: torch.as_tensor(d[key]).float().unsqueeze(0).to(image.device)}
            if self.random_map:
                generator = torch.Generator().manual_seed(self.seed)
                maps[f"{key}_random"] = torch.rand(maps[key].shape, generator=generator).to(image.device)
            for name, attribution in maps.items():
                for kind, metric in (("deletion", deletion_auc), ("insertion", insertion_auc)):
                    value = metric(self.network, image, attribution, target, self.steps, self.baseline, seed=self.seed)
                    d[f"{name}_{kind}_auc"] = value[0].detach().cpu()
        return d


class ExplanationLocalizationd(MapTransform):
    """Pointing game and relevance mass (:func:`monai_kdx.metrics.pointing_game`,
    :func:`~monai_kdx.metrics.relevance_mass`) of an explanation map of one sample against its lesion mask, written as
    scalars under ``"{key}_pointing_game"`` and ``"{key}_relevance_mass"`` (NaN for a lesion-free sample: nothing to
    point at), and, with ``random_map=True``, the same for a uniform random map (``"{key}_random_pointing_game"``,
    ``"{key}_random_relevance_mass"``): the chance level a map must beat. Per-sample values, so the main job can
    give bootstrap intervals.

    Args:
        keys: the map key(s); each map is (1, *spatial).
        mask_key: the binary lesion mask (1, *spatial).
        tolerance: the pointing game's dilation of the mask in pixels/voxels.
        random_map: also score a uniform random map (seeded by ``seed``; the same map as
            :class:`ExplanationFaithfulnessd`'s with the same seed).
        seed: seed of the random map.
    """

    def __init__(
        self, keys: KeysCollection, mask_key: str = "mask", tolerance: int = 0, random_map: bool = False, seed: int = 0
    ) -> None:
        super().__init__(keys)
        self.mask_key, self.tolerance, self.random_map, self.seed = mask_key, int(tolerance), bool(random_map), seed

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from monai_kdx.metrics import pointing_game, relevance_mass

        d = dict(data)
        if self.mask_key not in d:
            raise KeyError(f"{self.mask_key!r} is not in the data (keys: {sorted(map(str, d))}).")
        mask = (torch.as_tensor(d[self.mask_key]).float().unsqueeze(0) > 0).float()
        for key in self.key_iterator(d):
            maps = {key: torch.as_tensor(d[key]).float().unsqueeze(0).cpu()}
            if self.random_map:
                generator = torch.Generator().manual_seed(self.seed)
                maps[f"{key}_random"] = torch.rand(maps[key].shape, generator=generator)
            for name, attribution in maps.items():
                hit = pointing_game(attribution, mask.cpu(), tolerance=self.tolerance, ignore_empty=True)
                d[f"{name}_pointing_game"] = hit[0]
                d[f"{name}_relevance_mass"] = relevance_mass(attribution.clamp_min(0), mask.cpu(), ignore_empty=True)[0]
        return d


class SaveExplanationFigured(MapTransform):
    """Write one PNG per sample with :func:`monai_kdx.visualize.explanation_figure`: every level of a
    ``"<key>_levels"`` map from :class:`HierarchicalExplanationd` plus the fused ``key`` map, over the
    image (2D: overlays; 3D: the same slices, through the lesion or the fused map's peak, in every row), with a
    colour bar and a title naming the case, its label and the prediction. Named ``<case>_<key>.png`` after the
    case's path relative to ``data_root`` (:func:`~monai_kdx.transforms.case_name`), like the NIfTI heatmaps.

    Args:
        keys: the fused map key(s) (``"cam"``); the levels are read from ``"<key>_levels"`` when present.
        output_dir: the folder for the PNGs (created when missing).
        image_key: the image the maps explain.
        mask_key: an optional lesion mask drawn as an outline.
        data_root: the dataset's folder (case names are relative to it); None: the file's base name.
        label_key: the true class, shown in the title when present.
        pred_key: class scores (K,) whose argmax is shown as the prediction when present.
        max_figures: draw the first this many samples only (None: every sample); a figure takes about 0.3 s, far
            more than the maps it shows, so explaining hundreds of cases is dominated by drawing them all.

    Raises:
        ValueError: ``max_figures`` that is not a non-negative integer (or None).
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str,
        image_key: str = "image",
        mask_key: str | None = None,
        data_root: str | None = None,
        label_key: str = "label",
        pred_key: str = "pred",
        max_figures: int | None = None,
    ) -> None:
        super().__init__(keys)
        if max_figures is not None and (
            isinstance(max_figures, bool) or not isinstance(max_figures, int) or max_figures < 0
        ):
            raise ValueError(f"max_figures must be a non-negative integer or None, got {max_figures!r}.")
        self.output_dir, self.image_key, self.mask_key = output_dir, image_key, mask_key
        self.data_root, self.label_key, self.pred_key = data_root, label_key, pred_key
        self.max_figures = max_figures
        self.drawn = 0  # samples drawn so far

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        import os

        from monai_kdx.visualize import explanation_figure

        d = dict(data)
        if self.max_figures is not None and self.drawn >= self.max_figures:
            return d
        self.drawn += 1
        image = d[self.image_key]
        source = image.meta.get("filename_or_obj", "sample") if isinstance(image, MetaTensor) else "sample"
        stem = case_name(source, self.data_root)
        title = stem
        if self.label_key in d:
            title += f" · label {int(torch.as_tensor(d[self.label_key]).reshape(-1)[0])}"
        if self.pred_key in d:
            title += f" · predicted {int(torch.as_tensor(d[self.pred_key]).reshape(-1).argmax())}"
        mask = None
        if self.mask_key is not None and self.mask_key in d:
            mask = torch.as_tensor(d[self.mask_key])[0].cpu().numpy()
        os.makedirs(self.output_dir, exist_ok=True)
        for key in self.key_iterator(d):
            maps = {}
            levels = d.get(f"{key}_levels")
            if levels is not None:
                names = levels.meta.get("levels", range(len(levels))) if isinstance(levels, MetaTensor) else []
                maps.update({str(name): level.cpu().numpy() for name, level in zip(names, levels, strict=True)})
            maps["fused"] = torch.as_tensor(d[key])[0].cpu().numpy()
            path = os.path.join(self.output_dir, f"{stem}_{key}.png")
            explanation_figure(torch.as_tensor(image)[0].cpu().numpy(), maps, path, mask=mask, title=title)
        return d
