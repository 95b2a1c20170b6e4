"""FeatureCapture: values equal hand-run sub-networks, hooks never outlive the block, the model is
never mutated, gradients (also second order) flow, DDP prefixes resolve."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from monai.networks.nets import DenseNet121
from torch import nn

from monai_kdx.networks import FeatureCapture, module_paths, resolve_module, unwrap_network


def _conv_net(spatial_dims: int) -> nn.Sequential:
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    pool = nn.AdaptiveAvgPool2d if spatial_dims == 2 else nn.AdaptiveAvgPool3d
    return nn.Sequential(
        conv(1, 4, 3, padding=1), nn.ReLU(), conv(4, 6, 3, padding=1), nn.ReLU(), pool(1), nn.Flatten(), nn.Linear(6, 3)
    )


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_captured_values_match_hand_computation(spatial_dims):
    torch.manual_seed(0)
    net = _conv_net(spatial_dims)
    x = torch.randn(2, 1, *([8] * spatial_dims))
    with FeatureCapture(net, ["1", "3"]) as feats, FeatureCapture(net, "2", capture="input") as inputs:
        logits = net(x)
    torch.testing.assert_close(feats["1"], net[:2](x))
    torch.testing.assert_close(feats["3"], net[:4](x))
    torch.testing.assert_close(inputs["2"], net[:2](x))
    torch.testing.assert_close(logits, net[4:](feats["3"]))
    assert feats["3"].shape == (2, 6, *([8] * spatial_dims))
    assert list(feats) == ["1", "3"] and len(feats) == 2


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_monai_densenet_stages_2d_3d(spatial_dims):
    net = DenseNet121(spatial_dims=spatial_dims, in_channels=1, out_channels=4, init_features=8, growth_rate=4).eval()
    layers = ["features.denseblock1", "features.denseblock4"]
    with torch.no_grad(), FeatureCapture(net, layers) as feats:
        net(torch.randn(1, 1, *([32] * spatial_dims)))
    assert feats["features.denseblock1"].shape[2:] == (8,) * spatial_dims
    assert feats["features.denseblock4"].ndim == 2 + spatial_dims
    assert not feats["features.denseblock4"].requires_grad  # no graph under no_grad


def test_hooks_removed_after_block_and_after_exception_and_model_unchanged():
    net = _conv_net(2)
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    grads_flags = [p.requires_grad for p in net.parameters()]
    with FeatureCapture(net, ["1", "3"]) as feats:
        assert _hook_count(net) == 2
        net(torch.randn(1, 1, 8, 8)).sum().backward()
    assert _hook_count(net) == 0
    with pytest.raises(RuntimeError, match="boom"), FeatureCapture(net, ["1"]):
        raise RuntimeError("boom")
    assert _hook_count(net) == 0
    assert net.training and [p.requires_grad for p in net.parameters()] == grads_flags
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not any(hasattr(m, "_kdx") for m in net.modules())
    with pytest.raises(KeyError, match="not captured"):
        feats["5"]


def test_second_order_gradient_reaches_weights_through_a_cam_built_from_captured_features():
    """A Grad-CAM-like map built with create_graph=True gives a loss whose gradient reaches the weights."""
    torch.manual_seed(0)
    net = _conv_net(3)
    x = torch.randn(2, 1, 6, 6, 6)
    with FeatureCapture(net, "3") as feats:
        logits = net(x)
    activation = feats["3"]
    score = logits.gather(1, torch.tensor([[0], [2]])).sum()
    (grad,) = torch.autograd.grad(score, activation, create_graph=True)
    weights = grad.mean(dim=(2, 3, 4), keepdim=True)
    cam = torch.relu((weights * activation).sum(1))
    cam.mean().backward()
    first_conv = net[0].weight.grad
    assert first_conv is not None and first_conv.abs().sum() > 0
    # the part of the gradient that only exists through the second-order path: the last Linear layer
    # enters the CAM only through d(score)/d(activation), i.e. through create_graph=True
    assert net[6].weight.grad is not None and net[6].weight.grad.abs().sum() > 0


def test_unknown_path_lists_close_matches_and_stages():
    net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=2, init_features=8, growth_rate=4)
    with pytest.raises(ValueError, match=r"no submodule 'features.denseblok2'.*features.denseblock2.*Valid paths"):
        FeatureCapture(net, ["features.denseblok2"])
    with FeatureCapture(net, []) as nothing:  # an empty capture is a no-op
        net.eval()(torch.randn(1, 1, 32, 32))
    assert len(nothing) == 0 and _hook_count(net) == 0
    with pytest.raises(ValueError, match="capture must be"):
        FeatureCapture(net, "features", capture="grad")


def test_data_parallel_and_ddp_prefixes(tmp_path):
    net = _conv_net(2)
    x = torch.randn(1, 1, 8, 8)
    wrapped = nn.DataParallel(net)
    assert unwrap_network(wrapped) is net
    assert resolve_module(wrapped, "module.2") is net[2] and resolve_module(net, "module.2") is net[2]
    assert module_paths(wrapped)[:2] == ["0", "1"]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(net)
        with FeatureCapture(ddp, ["1", "module.3"]) as feats:
            ddp(x)
        torch.testing.assert_close(feats["module.3"], net[:4](x))
        assert _hook_count(net) == 0
    finally:
        dist.destroy_process_group()
