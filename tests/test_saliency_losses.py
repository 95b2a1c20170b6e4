"""Saliency losses: divergences against hand computations, empty target maps, gradients that reach the
weights (checked against finite differences), bad input, registry; 2D and 3D."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

from monai_kdx.explain import HierarchicalCAM
from monai_kdx.losses.saliency import (
    SALIENCY_DIVERGENCES,
    GAINLoss,
    RightForTheRightReasonsLoss,
    SaliencyAlignmentLoss,
    SaliencyContext,
    saliency_divergence,
)
from monai_kdx.metrics import saliency_kl, saliency_nss, saliency_sim
from monai_kdx.networks import ShallowCNN
from monai_kdx.registry import SALIENCY_LOSSES


class SmoothNet(nn.Module):
    """conv → tanh → conv ("feat") → tanh → global average pool → linear: smooth, so finite differences work."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.stem = conv(1, 3, 3, padding=1)
        self.feat = conv(3, 4, 3, padding=1, stride=2)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.feat(torch.tanh(self.stem(x)))).flatten(2).mean(-1))


def _losses(layer: str) -> dict[str, nn.Module]:
    losses = {f"align-{d}": SaliencyAlignmentLoss(layer, divergence=d) for d in SALIENCY_DIVERGENCES}
    losses["align-gradcam++"] = SaliencyAlignmentLoss(layer, method="gradcam++")
    losses["align-input-gradient"] = SaliencyAlignmentLoss(method="input_gradient", divergence="cc")
    losses["align-lrp"] = SaliencyAlignmentLoss(method="lrp", divergence="kl")
    losses["rrr"] = RightForTheRightReasonsLoss(weight=10.0)
    losses["gain"] = GAINLoss(layer)
    return losses


def _batch(dims: int, size: int = 8, batch: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, *(size,) * dims, generator=generator, dtype=torch.float64)
    target_map = torch.rand(batch, 1, *(size,) * dims, generator=generator, dtype=torch.float64)
    return x, torch.arange(batch) % 3, target_map


def test_divergences_match_hand_computations():
    generator = torch.Generator().manual_seed(1)
    s = torch.rand(2, 1, 5, 6, generator=generator, dtype=torch.float64)
    g = torch.rand(2, 1, 5, 6, generator=generator, dtype=torch.float64)
    fixations = (g > 0.7).double()
    for b in range(2):
        sn, gn = s[b].numpy().ravel(), g[b].numpy().ravel()
        p, q = sn / sn.sum(), gn / gn.sum()
        kl = np.sum(q * np.log(1e-7 + q / (p + 1e-7)))
        assert float(saliency_divergence(s, g, "kl")[b]) == pytest.approx(kl, rel=1e-9)
        assert float(saliency_divergence(s, g, "cc")[b]) == pytest.approx(1 - np.corrcoef(sn, gn)[0, 1], rel=1e-9)
        assert float(saliency_divergence(s, g, "sim")[b]) == pytest.approx(1 - np.minimum(p, q).sum(), rel=1e-9)
        mse = np.mean((sn / sn.max() - gn / gn.max()) ** 2)
        assert float(saliency_divergence(s, g, "mse")[b]) == pytest.approx(mse, rel=1e-9)
        z = (sn - sn.mean()) / sn.std()
        assert float(saliency_divergence(s, g, "nss")[b]) == pytest.approx(-(z * gn).sum() / gn.sum(), rel=1e-9)
    # the same values as the metrics module (KL, SIM; NSS on a binary fixation map)
    assert torch.allclose(saliency_divergence(s, g, "kl"), saliency_kl(s, g))
    assert torch.allclose(saliency_divergence(s, g, "sim"), 1 - saliency_sim(s, g))
    assert torch.allclose(saliency_divergence(s, fixations, "nss"), -saliency_nss(s, fixations))


@pytest.mark.parametrize("divergence", SALIENCY_DIVERGENCES)
def test_empty_target_maps_contribute_nothing_and_never_nan(divergence):
    loss = SaliencyAlignmentLoss(divergence=divergence)
    s = torch.rand(3, 1, 6, 6, dtype=torch.float64)
    g = torch.rand(3, 1, 6, 6, dtype=torch.float64)
    g[1] = 0.0
    mixed = loss(s, g)
    valid_only = loss(s[[0, 2]], g[[0, 2]])
    assert float(mixed) == pytest.approx(float(valid_only), rel=1e-12)  # the mean runs over valid samples
    for saliency in (torch.zeros_like(s), torch.full_like(s, 0.3), s):  # constant maps included
        saliency = saliency.clone().requires_grad_(True)
        value = loss(saliency, torch.zeros_like(g))  # an all-empty batch
        (grad,) = torch.autograd.grad(value, saliency)
        assert float(value) == 0.0 and torch.isfinite(grad).all()
        (grad,) = torch.autograd.grad(loss(saliency, g), saliency)
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("dims", [2, 3])
def test_every_loss_gives_weight_gradients_and_skips_empty_maps(dims):
    torch.manual_seed(0)
    net = ShallowCNN(dims, 1, 3, channels=(4, 8, 8), hidden=8)
    x, y, g = (t.float() if t.is_floating_point() else t for t in _batch(dims, size=16))
    g[0] = 0.0
    first_conv = net.blocks[0][0].weight
    for name, loss in _losses("blocks.1").items():
        context = loss.context(net, x, y, g)
        value = loss.from_context(context)
        assert value.ndim == 0 and torch.isfinite(value), name
        (grad,) = torch.autograd.grad(value, first_conv)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name  # reaches the first layer
        empty = loss.context(net, x, y, torch.zeros_like(g))
        zero = loss.from_context(empty)
        assert float(zero) == 0.0 and zero.requires_grad, name  # all-empty batch: 0, still backward-able
        (grad,) = torch.autograd.grad(zero, first_conv, allow_unused=True)
        assert grad is None or not grad.any()


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", ["align-kl", "align-cc", "align-nss", "align-input-gradient", "rrr", "gain"])
def test_gradient_matches_finite_differences(dims, name):
    """Central differences on single weights agree with autograd: the saliency is differentiable
    end to end (a CAM under no_grad would give zero here)."""
    torch.manual_seed(0)
    net = SmoothNet(dims).double()
    x, y, g = _batch(dims, size=6)
    loss = _losses("feat")[name]

    def value() -> torch.Tensor:
        return loss.from_context(loss.context(net, x, y, g))

    weight = net.stem.weight
    (grad,) = torch.autograd.grad(value(), weight)
    assert grad.abs().max() > 1e-8
    index = tuple(int(i) for i in np.unravel_index(int(grad.abs().argmax()), grad.shape))
    step = 1e-6
    with torch.no_grad():
        weight[index] += step
        up = float(value())
        weight[index] -= 2 * step
        down = float(value())
        weight[index] += step
    assert (up - down) / (2 * step) == pytest.approx(float(grad[index]), rel=1e-4, abs=1e-9)


def test_the_pitfall_cam_without_graph_gives_no_gradient_ours_does():
    torch.manual_seed(0)
    net = SmoothNet(2)
    x, y, g = (t.float() if t.is_floating_point() else t for t in _batch(2, size=8))
    detached = HierarchicalCAM(net, "feat").cam(x, y).levels["feat"]  # create_graph=False
    assert not detached.requires_grad
    loss = SaliencyAlignmentLoss("feat")
    assert loss(loss.saliency(loss.context(net, x, y, g)), g).requires_grad


@pytest.mark.parametrize("dims", [2, 3])
def test_saliency_is_upsampled_to_the_target_map_and_pure_form_agrees(dims):
    torch.manual_seed(0)
    net = ShallowCNN(dims, 1, 3, channels=(4, 8), hidden=0)
    x, y, g = (t.float() if t.is_floating_point() else t for t in _batch(dims, size=16))
    loss = SaliencyAlignmentLoss("blocks.1", divergence="kl")
    context = loss.context(net, x, y, g)
    saliency = loss.saliency(context)
    assert saliency.shape == g.shape and float(saliency.min()) >= 0 and float(saliency.max()) <= 1
    assert float(loss.from_context(context)) == pytest.approx(float(loss(saliency, g)), rel=1e-6)
    weighted = SaliencyAlignmentLoss("blocks.1", weight=3.0)
    assert float(weighted(saliency, g)) == pytest.approx(3.0 * float(loss(saliency, g)), rel=1e-6)
    # the CAM of the TRUE class, per sample (not the predicted one)
    other = SaliencyContext(net, context.inputs, context.logits, context.features, (y + 1) % 3, g)
    assert not torch.allclose(loss.saliency(other), saliency)


def test_layer_none_picks_the_deepest_stage():
    net = ShallowCNN(2, 1, 3, channels=(4, 8, 8), hidden=0)
    loss = SaliencyAlignmentLoss()
    x, y, g = (t.float() if t.is_floating_point() else t for t in _batch(2, size=16))
    loss.from_context(loss.context(net, x, y, g))
    assert loss.layer == "blocks.2"


def test_bad_input_fails_clearly_before_work():
    net = ShallowCNN(2, 1, 3, channels=(4, 8), hidden=0)
    x = torch.randn(2, 1, 16, 16)
    y = torch.tensor([0, 1])
    loss = SaliencyAlignmentLoss("blocks.1")
    for bad, message in [
        (torch.rand(2, 1, 8, 8), "no broadcasting"),
        (torch.rand(1, 1, 16, 16), "no broadcasting"),
        (torch.rand(2, 16, 16), "no broadcasting"),
        (torch.rand(2, 2, 16, 16), "no broadcasting"),
        (-torch.rand(2, 1, 16, 16), "non-negative"),
        (torch.full((2, 1, 16, 16), float("nan")), "NaN"),
    ]:
        with pytest.raises(ValueError, match=message):
            loss.context(net, x, y, bad)
        context = SaliencyContext(net, x, net(x), {"blocks.1": torch.zeros(2, 8, 4, 4)}, y, bad)
        with pytest.raises(ValueError, match=message):
            loss.from_context(context)
    with pytest.raises(ValueError, match="no broadcasting"):
        loss(torch.rand(2, 1, 16, 16), torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"no submodule 'blocks\.7'.*Close matches: \['blocks\.1'"):
        SaliencyAlignmentLoss("blocks.7").check_network(net)
    with pytest.raises(ValueError, match="Close matches"):
        GAINLoss("blocks.11").context(net, x, y, torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match="unknown divergence"):
        SaliencyAlignmentLoss("blocks.1", divergence="emd")
    with pytest.raises(ValueError, match="unknown saliency method"):
        SaliencyAlignmentLoss("blocks.1", method="lime")
    with pytest.raises(ValueError, match="weight"):
        RightForTheRightReasonsLoss(weight=-1.0)
    with pytest.raises(ValueError, match="map_marks"):
        RightForTheRightReasonsLoss(map_marks="both")
    with pytest.raises(ValueError, match="out of range"):
        loss.from_context(loss.context(net, x, torch.tensor([0, 5]), torch.rand(2, 1, 16, 16)))


def test_right_for_the_right_reasons_penalizes_only_outside_the_relevant_region():
    """A linear model y = w·x: ∂Σ log softmax/∂x is known in closed form; A = 1 − mask."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 2, bias=False)).double()
    x = torch.randn(1, 1, 4, 4, dtype=torch.float64)
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    mask[..., :2, :] = 1.0
    loss = RightForTheRightReasonsLoss(weight=2.0)
    value = loss.from_context(loss.context(net, x, torch.tensor([0]), mask))
    weight = net[1].weight
    p = torch.softmax(net(x), dim=1)
    grad = (weight.sum(0) - 2 * (p @ weight)).view(1, 1, 4, 4)  # ∂Σ_k log p_k/∂x = Σ_k w_k − K·Σ_j p_j w_j
    expected = 2.0 * ((1 - mask) * grad).pow(2).sum()
    assert float(value) == pytest.approx(float(expected), rel=1e-10)
    irrelevant = RightForTheRightReasonsLoss(weight=2.0, map_marks="irrelevant")
    flipped = irrelevant.from_context(irrelevant.context(net, x, torch.tensor([0]), 1 - mask))
    assert float(flipped) == pytest.approx(float(expected), rel=1e-10)


def test_gain_parts():
    torch.manual_seed(0)
    net = SmoothNet(2).double()
    x, y, g = _batch(2, size=8)
    g[2] = 0.0
    loss = GAINLoss("feat", mining_weight=2.0, pixel_weight=3.0)
    context = loss.context(net, x, y, g)
    parts = loss.parts(context)
    assert 0.0 < float(parts["mining"]) < 1.0 and float(parts["pixel"]) > 0.0
    total = loss.from_context(context)
    assert float(total) == pytest.approx(2.0 * float(parts["mining"]) + 3.0 * float(parts["pixel"]), rel=1e-10)


def test_registered_by_name():
    assert SALIENCY_LOSSES.get("alignment") is SaliencyAlignmentLoss
    assert SALIENCY_LOSSES.get("rrr") is RightForTheRightReasonsLoss
    assert SALIENCY_LOSSES.get("gain") is GAINLoss


def test_finite_under_bfloat16_autocast():
    torch.manual_seed(0)
    net = ShallowCNN(2, 1, 3, channels=(4, 8), hidden=0)
    x, y, g = (t.float() if t.is_floating_point() else t for t in _batch(2, size=16))
    loss = SaliencyAlignmentLoss("blocks.1")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss.from_context(loss.context(net, x, y, g))
    value.backward()
    assert torch.isfinite(value) and all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


# ---------------------------------------------------------------- issue 14: NaN images, invalid constructor arguments


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", ["align-kl", "align-input-gradient", "rrr", "gain"])
def test_nan_image_is_refused_before_a_finite_loss_with_nan_gradients(dims, name):
    """One NaN pixel: the Grad-CAM alignment loss was finite (0.19) while every weight gradient was NaN, so a
    training step silently destroyed the model. Every saliency loss now refuses the image, naming the sample."""
    torch.manual_seed(0)
    net = SmoothNet(dims).double()
    loss = _losses("feat")[name]
    x, y, g = _batch(dims)
    x[1].view(-1)[5] = float("nan")
    with pytest.raises(ValueError, match=r"inputs has NaN or infinite values \(samples \[1\]\)"):
        loss.context(net, x, y, g)
    clean = loss.context(net, x.nan_to_num(), y, g)
    with pytest.raises(ValueError, match=r"inputs has NaN or infinite values \(samples \[1\]\)"):
        loss.from_context(SaliencyContext(net, x, clean.logits, clean.features, y, g))
    x[1] = x[1].nan_to_num(posinf=0.0)
    x[2].view(-1)[0] = float("inf")
    with pytest.raises(ValueError, match=r"inputs has NaN or infinite values \(samples \[2\]\)"):
        loss.context(net, x, y, g)


BAD_ARGUMENTS = [  # (factory, argument, bad values, the bound named in the message)
    pytest.param(
        lambda v: SaliencyAlignmentLoss("feat", weight=v),
        "weight",
        [-1.0, float("nan"), float("inf"), "1", True],
        ">=",
        id="alignment-weight",
    ),
    pytest.param(
        lambda v: SaliencyAlignmentLoss("feat", eps=v),
        "eps",
        [0.0, -1e-7, float("nan"), float("inf")],
        "> 0",
        id="alignment-eps",
    ),
    pytest.param(
        lambda v: RightForTheRightReasonsLoss(weight=v),
        "weight",
        [-10.0, float("nan"), float("inf")],
        ">= 0",
        id="rrr-weight",
    ),
    pytest.param(
        lambda v: GAINLoss("feat", mining_weight=v), "mining_weight", [-1.0, float("nan")], ">= 0", id="gain-mining"
    ),
    pytest.param(
        lambda v: GAINLoss("feat", pixel_weight=v), "pixel_weight", [-1.0, float("inf")], ">= 0", id="gain-pixel"
    ),
    pytest.param(lambda v: GAINLoss("feat", sigma=v), "sigma", [float("nan"), -0.1, 1.5], "", id="gain-sigma"),
    pytest.param(
        lambda v: GAINLoss("feat", omega=v), "omega", [0.0, -10.0, float("nan"), float("inf")], "> 0", id="gain-omega"
    ),
    pytest.param(
        lambda v: saliency_divergence(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4), eps=v),
        "eps",
        [0.0, -1.0],
        "> 0",
        id="divergence-eps",
    ),
]


@pytest.mark.parametrize(("factory", "argument", "values", "bound"), BAD_ARGUMENTS)
def test_invalid_loss_arguments_are_refused_at_construction(factory, argument, values, bound):
    """A NaN weight makes every loss NaN, a negative one maximizes the divergence, eps <= 0 takes log(0), an
    infinite omega gives NaN at sigma: each is refused with one line naming the argument (eps, omega, sigma and
    string or boolean weights were accepted before)."""
    for value in values:
        with pytest.raises(ValueError, match=rf"^{argument} must be .*{re.escape(bound)}.*got"):
            factory(value)


@pytest.mark.parametrize("dims", [2, 3])
def test_the_hierarchical_explanation_itself_can_be_guided(dims):
    """layer="stages": the saliency is the fused map of every stage, the very map HierarchicalCAM reports."""
    from monai_kdx.explain import HierarchicalCAM
    from monai_kdx.networks import ShallowCNN

    torch.manual_seed(0)
    network = ShallowCNN(dims, 1, 3, channels=(4, 8, 8), dropout=0.0).eval()
    images = torch.randn(2, 1, *[16] * dims)
    labels = torch.tensor([0, 2])
    target = torch.rand(2, 1, *[16] * dims)
    loss = SaliencyAlignmentLoss(layer="stages", divergence="cc")
    loss.resolve_layers(network, images)
    assert loss.layers == ("blocks.0", "blocks.1", "blocks.2")  # 8, 4 and 2 positions per axis
    context = loss.context(network, images, labels, target)
    saliency = loss.saliency(context)
    reported = HierarchicalCAM(network, layers=list(loss.layers)).cam(images, labels).fused
    torch.testing.assert_close(saliency.detach(), reported, atol=1e-5, rtol=1e-4)
    value = loss.from_context(context)
    grads = torch.autograd.grad(value, [p for p in network.parameters() if p.requires_grad], allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    with pytest.raises(ValueError, match="layer must hold module paths"):
        SaliencyAlignmentLoss(layer=["blocks.0", ""])
