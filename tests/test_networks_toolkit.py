"""The shared network toolkit: modes restored, class targets converted, one tracing probe for stages, head and
BatchNorm pairs, the timer and the profile."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.networks.nets import DenseNet121, resnet10
from torch import nn

from monai_kdx.networks import (
    ShallowCNN,
    class_indices,
    count_macs,
    latency_ms,
    latency_ratio,
    median_seconds,
    resolve_targets,
    restore_mode,
    split_batch,
    trace_network,
)


def test_restore_mode_restores_every_submodule_also_on_error():
    net = ShallowCNN(2, 1, 3)
    net.train()
    net.blocks[0][1].eval()  # a frozen BatchNorm inside a training model
    with pytest.raises(RuntimeError), restore_mode(net):
        assert not any(module.training for module in net.modules())
        raise RuntimeError("inside")
    assert net.training and not net.blocks[0][1].training and net.blocks[1][1].training


@pytest.mark.parametrize(
    ("target", "kwargs", "expected"),
    [
        (2, {"batch_size": 3, "broadcast": True}, [2, 2, 2]),
        ([0, 2, 1], {}, [0, 2, 1]),
        (np.array([1, 0]), {}, [1, 0]),
        (torch.tensor([[1], [0]]), {}, [1, 0]),
        (torch.tensor([2.0, 0.0]), {}, [2, 0]),
        (torch.tensor([[0, 0, 1], [1, 0, 0]]), {"one_hot": True}, [2, 0]),
    ],
)
def test_class_indices_accepts_the_usual_forms(target, kwargs, expected):
    assert class_indices(target, num_classes=3, **kwargs).tolist() == expected


def test_resolve_targets_uses_the_argmax_for_none_and_checks_against_the_logits():
    logits = torch.tensor([[0.1, 0.9], [2.0, -1.0]])
    assert resolve_targets(None, logits).tolist() == [1, 0]
    assert resolve_targets(1, logits).tolist() == [1, 1]
    with pytest.raises(ValueError, match="class 2, out of range for a network with 2 classes"):
        resolve_targets(torch.tensor([0, 2]), logits)


def test_split_batch_reads_dicts_pairs_and_tensors():
    image = torch.zeros(2, 1, 4, 4)
    assert split_batch({"image": image, "label": 1})[1] == 1
    assert split_batch((image, 3))[1] == 3 and split_batch(image)[1] is None
    with pytest.raises(TypeError, match="'image' key"):
        split_batch({"img": image})


def test_one_trace_gives_stages_head_and_batchnorm_pairs():
    dense = DenseNet121(spatial_dims=2, in_channels=1, out_channels=2, init_features=4, growth_rate=2)
    trace = trace_network(dense, torch.randn(2, 1, 64, 64))
    assert trace.stage_layers() == [f"features.denseblock{i}" for i in range(1, 5)]
    assert trace.head() == "class_layers.out"
    pairs = trace.batchnorm_pairs()
    assert (("features.conv0",), "features.norm0") in pairs
    assert all(bn == "features.norm0" or bn.endswith("norm2") for _, bn in pairs)  # never a pre-activation norm
    resnet = resnet10(spatial_dims=2, n_input_channels=1, num_classes=2)
    trace = trace_network(resnet, torch.randn(1, 1, 32, 32))
    assert trace.stage_layers() == ["layer1", "layer2", "layer3", "layer4"] and trace.head() == "fc"
    assert (("layer1.0.conv1",), "layer1.0.bn1") in trace.batchnorm_pairs()
    wrapped = nn.DataParallel(ShallowCNN(2, 1, 2, channels=(4, 8)))
    assert trace_network(wrapped, torch.randn(1, 1, 16, 16)).head() == "module.head.4"


def test_a_batchnorm_reading_a_shared_tensor_is_not_merged():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            y = self.conv(x)
            return self.head((self.bn(y) + y).mean((2, 3)))  # the conv output also feeds the sum

    assert trace_network(Shared(), torch.randn(1, 1, 8, 8)).batchnorm_pairs() == []


def test_macs_by_hand_and_the_timer():
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    assert count_macs(net, (1, 4, 4)) == 2 * 16 * 9 + 3 * 32
    calls = []
    assert median_seconds(lambda: calls.append(1), repeats=3, warmup=2) >= 0 and len(calls) == 5
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        median_seconds(lambda: None, repeats=0)
    net.train()
    assert latency_ms(net, torch.randn(1, 1, 4, 4), repeats=2) > 0 and net.training


def test_a_latency_ratio_is_the_median_of_ratios_timed_in_turn(monkeypatch):
    """Each round times the network, then the reference; the ratio is the median of the rounds' ratios (a round in
    which the machine slowed down slows both of its sides)."""
    from monai_kdx.networks import profiling

    network, reference = nn.Identity(), nn.Identity()
    clock = iter([1.0, 2.0, 3.0, 3.0, 0.5, 10.0, 8.0, 8.0, 2.0, 8.0])  # ratios 0.5, 1, 0.05, 1, 0.25
    calls = []

    def timed(model, example, repeats):
        calls.append((model, repeats))
        return next(clock)

    monkeypatch.setattr(profiling, "latency_ms", timed)
    assert latency_ratio(network, reference, torch.zeros(1), rounds=5, repeats=4) == 0.5
    assert calls == [(network, 4), (reference, 4)] * 5
    with pytest.raises(ValueError, match="rounds and repeats must be >= 1"):
        latency_ratio(network, reference, torch.zeros(1), rounds=0)


def test_stages_with_one_position_are_not_picked_and_a_loss_on_them_is_refused():
    from monai_kdx.explain import HierarchicalCAM, cam_from_features
    from monai_kdx.losses import SaliencyAlignmentLoss

    dense = DenseNet121(spatial_dims=3, in_channels=1, out_channels=2, init_features=4, growth_rate=2).eval()
    x = torch.randn(2, 1, 32, 32, 32)  # denseblock4 gives 1x1x1 maps here
    assert trace_network(dense, x).stage_layers() == [f"features.denseblock{i}" for i in (1, 2, 3)]
    assert list(HierarchicalCAM(dense).cam(x)) == [f"features.denseblock{i}" for i in (1, 2, 3)]
    loss = SaliencyAlignmentLoss(layer=None)
    loss.resolve_layers(dense, x)
    assert loss.layer == "features.denseblock3"  # the deepest usable stage, not the 1-voxel one
    feature = torch.randn(2, 8, 1, 1, 1, requires_grad=True)
    logits = feature.flatten(1)[:, :2] * 2
    with pytest.raises(ValueError, match=r"gives a \(1, 1, 1\) map for this input: one position"):
        cam_from_features({"deep": feature}, logits, torch.tensor([0, 1]), create_graph=True)
    with pytest.raises(ValueError, match="every stage of DenseNet121 gives maps smaller than 64 per axis"):
        trace_network(dense, x).stage_layers(min_size=64)
