"""The CAM core: hand-computed maps, one forward + one backward, per-sample classes, clean-up, 2D/3D."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from monai.networks.nets import DenseNet121, resnet10
from monai.visualize import GradCAM
from torch import nn

from monai_kdx.explain import HierarchicalCAM, build_explainer, cam_from_features, stage_layers
from monai_kdx.networks import ShallowCNN


class ConvGapLinear(nn.Module):
    """conv (layer "feat") → global average pool → linear: the gradient at "feat" is W[c, k] / N."""

    def __init__(self, spatial_dims: int, channels: int = 3, classes: int = 2) -> None:
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.feat = conv(1, channels, 3, padding=1)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.feat(x).flatten(2).mean(-1))


def _reference_maps(activation: np.ndarray, grad: np.ndarray) -> dict[str, np.ndarray]:
    """Independent per-element NumPy loops for one sample: activation, grad (K, *spatial)."""
    k_count = activation.shape[0]
    n = activation[0].size
    gradcam = sum(grad[k].sum() / n * activation[k] for k in range(k_count))
    layercam = sum(np.maximum(grad[k], 0) * activation[k] for k in range(k_count))
    plus = np.zeros_like(activation[0])
    for k in range(k_count):
        total = activation[k].sum()
        weight = 0.0
        for g in grad[k].ravel():
            denominator = 2 * g**2 + total * g**3
            alpha = g**2 / denominator if denominator != 0 else 0.0
            weight += alpha * max(g, 0.0)
        plus = plus + weight * activation[k]
    return {
        "gradcam": np.maximum(gradcam, 0),
        "gradcam++": np.maximum(plus, 0),
        "layercam": np.maximum(layercam, 0),
        "activation": activation.mean(0),
    }


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("mode", ["gradcam", "gradcam++", "layercam", "activation"])
def test_raw_maps_match_a_hand_computation(spatial_dims: int, mode: str) -> None:
    torch.manual_seed(0)
    net = ConvGapLinear(spatial_dims).double()
    x = torch.randn(2, 1, *([5] * spatial_dims), dtype=torch.float64)
    activation = net.feat(x).detach()
    # d logit_c / d A_k = W[c, k] / N everywhere: write the gradient out by hand
    n = activation[0, 0].numel()
    targets = torch.tensor([1, 0])
    grad = net.head.weight.detach()[targets][..., *([None] * spatial_dims)].expand_as(activation) / n
    result = HierarchicalCAM(net, ["feat"], mode=mode, normalize=False).cam(x, targets)
    for b in range(2):
        expected = _reference_maps(activation[b].numpy(), grad[b].numpy())[mode]
        np.testing.assert_allclose(result["feat"][b, 0].numpy(), expected, rtol=1e-10, atol=1e-12)
    assert result.targets.tolist() == [1, 0]


def test_gradcam_plus_plus_weights_on_a_spatially_varying_gradient_in_3d() -> None:
    # A two-layer head makes the gradient vary over space: compare with the per-element loops.
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv3d(1, 2, 3, padding=1), nn.Conv3d(2, 3, 1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4**3, 2)
    ).double()
    x = torch.randn(1, 1, 4, 4, 4, dtype=torch.float64)
    activation = net[0](x)
    grad = torch.autograd.grad(net[2:](net[1](activation))[0, 1], activation)[0]
    result = HierarchicalCAM(net, ["0"], mode="gradcam++", normalize=False).cam(x, 1)
    expected = _reference_maps(activation[0].detach().numpy(), grad[0].numpy())["gradcam++"]
    assert np.abs(expected).max() > 0
    np.testing.assert_allclose(result["0"][0, 0].detach().numpy(), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_gradcam_agrees_with_monai_gradcam(spatial_dims: int) -> None:
    torch.manual_seed(0)
    net = DenseNet121(spatial_dims, 1, 3, init_features=8, growth_rate=4, block_config=(2, 2, 2, 2)).eval()
    x = torch.randn(1, 1, *([32] * spatial_dims))
    layer = "features.denseblock3"
    ours = HierarchicalCAM(net, [layer], normalize=False).cam(x, 2)[layer]
    monai_map = GradCAM(net, target_layers=layer).compute_map(x, class_idx=2, layer_idx=-1)
    ours_native = cam_from_features_at(net, x, layer, 2)
    torch.testing.assert_close(ours_native, monai_map, rtol=1e-4, atol=1e-6)
    assert ours.shape == (1, 1, *([32] * spatial_dims))


def cam_from_features_at(net: nn.Module, x: torch.Tensor, layer: str, target: int) -> torch.Tensor:
    from monai_kdx.networks import FeatureCapture

    with FeatureCapture(net, [layer]) as feats:
        logits = net(x)
        return cam_from_features(feats, logits, torch.tensor([target]), normalize=False)[layer]


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_per_sample_classes_are_not_mixed(spatial_dims: int) -> None:
    torch.manual_seed(0)
    net = ShallowCNN(spatial_dims, 1, 3, channels=(4, 8, 8)).eval()
    x = torch.randn(3, 1, *([16] * spatial_dims))
    cam = HierarchicalCAM(net, mode="gradcam++")
    batch = cam.cam(x, torch.tensor([0, 2, 1]))
    for b, target in enumerate([0, 2, 1]):
        alone = cam.cam(x[b : b + 1], target)
        for path in batch:
            torch.testing.assert_close(batch[path][b : b + 1], alone[path], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(batch.fused[b : b + 1], alone.fused, rtol=1e-4, atol=1e-5)
    # a different class really changes the map
    other = cam.cam(x, torch.tensor([1, 0, 2]))
    assert not torch.allclose(other.fused, batch.fused)
    # None: each sample's own argmax
    assert cam.cam(x).targets.tolist() == net(x).argmax(1).tolist()


def test_one_forward_one_backward_no_parameter_gradients_hooks_or_mode_changes() -> None:
    torch.manual_seed(0)
    net = DenseNet121(3, 1, 2, init_features=8, growth_rate=4, block_config=(2, 2, 2, 2))
    net.train()
    net.class_layers.out.weight.grad = torch.full_like(net.class_layers.out.weight, 7.0)
    forwards, backwards = [], []
    net.register_forward_hook(lambda *args: forwards.append(1))
    first_conv = net.features.conv0
    first_conv.register_full_backward_hook(lambda *args: backwards.append("conv0"))
    net.features.denseblock1.register_full_backward_hook(lambda *args: backwards.append("denseblock1"))
    net.features.denseblock2.register_full_backward_hook(lambda *args: backwards.append("denseblock2"))
    hooks_before = {name: (len(m._forward_hooks), len(m._backward_hooks)) for name, m in net.named_modules()}
    result = HierarchicalCAM(net, ["features.denseblock1", "features.denseblock4"]).cam(torch.randn(2, 1, 32, 32, 32))
    assert len(forwards) == 1
    # one backward pass: it goes through denseblock2 once, reaches the output of the shallowest explained
    # level and stops there (gradients with respect to denseblock1's inputs or conv0 are never computed)
    assert backwards == ["denseblock2"]
    assert net.training and all(m.training for m in net.modules())
    assert torch.equal(net.class_layers.out.weight.grad, torch.full_like(net.class_layers.out.weight, 7.0))
    assert all(p.grad is None for name, p in net.named_parameters() if name != "class_layers.out.weight")
    hooks_after = {name: (len(m._forward_hooks), len(m._backward_hooks)) for name, m in net.named_modules()}
    assert hooks_after == hooks_before
    assert not result.fused.requires_grad


def test_eval_mode_is_used_and_a_frozen_network_under_no_grad_works() -> None:
    torch.manual_seed(0)
    net = ShallowCNN(2, 1, 2, channels=(4, 8), dropout=0.9)
    net.train()
    for p in net.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 1, 16, 16)
    cam = HierarchicalCAM(net)
    with torch.no_grad():
        first, second = cam.cam(x), cam.cam(x)
    torch.testing.assert_close(first.fused, second.fused)  # dropout off: eval mode during the call
    assert first.fused.abs().sum() > 0
    assert net.training


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_create_graph_lets_a_loss_on_the_maps_train_the_network(spatial_dims: int) -> None:
    torch.manual_seed(0)
    net = ShallowCNN(spatial_dims, 1, 2, channels=(4, 8, 8)).eval()
    x = torch.randn(2, 1, *([16] * spatial_dims))
    result = HierarchicalCAM(net, mode="gradcam").cam(x, 1, create_graph=True)
    assert result.fused.requires_grad
    mask = torch.zeros_like(result.fused)
    mask[..., :8] = 1
    loss = ((result.fused - mask) ** 2).mean()
    grads = torch.autograd.grad(loss, [net.blocks[0][0].weight, net.head[-1].weight], allow_unused=True)
    # the first conv (before every explained layer) and the head weights (only reachable through the
    # CAM's gradient weights, i.e. second order) both get a non-zero gradient
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    # without create_graph, the maps are plain tensors
    assert not HierarchicalCAM(net).cam(x, 1).fused.requires_grad


def test_stage_layers_of_monai_networks_and_wrappers() -> None:
    x3 = torch.randn(1, 1, 32, 32, 32)
    dense = DenseNet121(3, 1, 2, init_features=8, growth_rate=4, block_config=(2, 2, 2, 2))
    assert stage_layers(dense, torch.randn(1, 1, 64, 64, 64)) == [f"features.denseblock{i}" for i in range(1, 5)]
    assert stage_layers(dense, x3) == [f"features.denseblock{i}" for i in range(1, 4)]  # block 4: 1 voxel
    assert stage_layers(resnet10(spatial_dims=3, n_input_channels=1, num_classes=2), x3) == [
        "layer1",
        "layer2",
        "layer3",
        "layer4",
    ]
    assert stage_layers(ShallowCNN(2, 1, 2, channels=(4, 8, 8)), torch.randn(1, 1, 32, 32)) == [
        "blocks.0",
        "blocks.1",
        "blocks.2",
    ]
    wrapped = nn.DataParallel(dense)
    assert stage_layers(wrapped, x3)[0] == "module.features.denseblock1"
    assert len(HierarchicalCAM(wrapped).cam(x3)) == 3


def test_constant_maps_are_zeros_not_nan() -> None:
    net = ConvGapLinear(2)
    nn.init.zeros_(net.feat.weight)
    nn.init.zeros_(net.feat.bias)
    for mode in ["gradcam", "gradcam++", "layercam", "activation"]:
        result = HierarchicalCAM(net, ["feat"], mode=mode).cam(torch.randn(2, 1, 8, 8))
        assert torch.equal(result["feat"], torch.zeros(2, 1, 8, 8))
        assert torch.equal(result.fused, torch.zeros(2, 1, 8, 8))


def test_registered_modes_and_fusions() -> None:
    net = ShallowCNN(3, 1, 2, channels=(4, 8)).eval()
    x = torch.randn(2, 1, 16, 16, 16)
    for mode in ["gradcam", "gradcam++", "layercam", "activation"]:
        fused = build_explainer(mode, net).attribute(x)
        assert fused.shape == (2, 1, 16, 16, 16) and fused.min() >= 0 and fused.max() <= 1
    cam = HierarchicalCAM(net, mode="activation", fusion="max").cam(x)
    expected = torch.maximum(cam["blocks.0"], cam["blocks.1"])
    low = expected.flatten(1).min(1).values.view(-1, 1, 1, 1, 1)
    high = expected.flatten(1).max(1).values.view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(cam.fused, (expected - low) / (high - low))


def test_bad_input_gets_clear_errors_before_any_work() -> None:
    net = ShallowCNN(3, 1, 3, channels=(4, 8))
    calls = []
    net.register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match="no module 'blocks.9'|blocks.0"):
        HierarchicalCAM(net, ["blocks.9"])
    with pytest.raises(ValueError, match=re.escape("unknown CAM mode 'gradcam+'")):
        HierarchicalCAM(net, mode="gradcam+")
    with pytest.raises(ValueError, match="unknown fusion"):
        HierarchicalCAM(net, fusion="median")
    cam = HierarchicalCAM(net, ["blocks.1"])
    with pytest.raises(ValueError, match="out of range for a network with 3 classes"):
        cam.cam(torch.randn(1, 1, 8, 8, 8), 3)
    with pytest.raises(ValueError, match="2 spatial dimensions but ShallowCNN uses 3D"):
        cam.cam(torch.randn(1, 1, 8, 8))
    x = torch.randn(1, 1, 8, 8, 8)
    x[0, 0, 1, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        cam.cam(x)
    with pytest.raises(ValueError, match="3 entries for a batch of 2"):
        cam.cam(torch.randn(2, 1, 8, 8, 8), torch.tensor([0, 1, 2]))
    assert calls == []
