"""Relevance collection, structural pruning by relevance and pruned-model persistence (tiny 2D/3D models)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from monai.networks.nets import DenseNet121, UNet, resnet10
from torch import nn

from monai_kdx.networks import ShallowCNN, count_macs, count_parameters, densenet_student
from monai_kdx.pruning import (
    BacktraceRelevance,
    IntegratedGradientsRelevance,
    LRPRelevance,
    check_prunable,
    collect_relevance,
    load_pruned,
    prune_by_relevance,
    save_pruned,
)
from monai_kdx.registry import RELEVANCE_METHODS

DATA_METHODS = ["lrp", "taylor", "ig", "backtrace"]


def _loader(shape, classes=3, batches=2, seed=0, kind="dict"):
    generator = torch.Generator().manual_seed(seed)
    batches_ = []
    for _ in range(batches):
        image = torch.randn(*shape, generator=generator)
        label = torch.randint(0, classes, (shape[0],), generator=generator)
        batches_.append({"image": image, "label": label} if kind == "dict" else (image, label))
    return batches_


def _tiny_sequential(bias: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, bias=bias),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, bias=bias),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3, bias=bias),
    ).eval()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert after[key].shape == value.shape and torch.equal(after[key], value), key


def _no_hooks(model: nn.Module) -> bool:
    return all(
        not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks and not m._backward_pre_hooks
        for m in model.modules()
    )


# ----------------------------------------------------------------------------------------------------------------------
# pruning shrinks the network
# ----------------------------------------------------------------------------------------------------------------------
def _dn2():
    return DenseNet121(spatial_dims=2, in_channels=1, out_channels=3, init_features=8, growth_rate=4), (2, 1, 32, 32)


def _dn3():
    network = DenseNet121(spatial_dims=3, in_channels=1, out_channels=3, init_features=8, growth_rate=4)
    return network, (1, 1, 32, 32, 32)


def _rn3():
    return resnet10(spatial_dims=3, n_input_channels=1, num_classes=3, widen_factor=0.125), (2, 1, 16, 16, 16)


def _shallow():
    return ShallowCNN(2, 1, 3, channels=(4, 8, 8), hidden=8), (4, 1, 16, 16)


@pytest.mark.parametrize(
    "build, method",
    [(_dn2, "lrp"), (_dn3, "taylor"), (_rn3, "backtrace"), (_shallow, "ig"), (_rn3, "lrp"), (_shallow, "magnitude")],
    ids=[
        "densenet121-2d-lrp",
        "densenet121-3d-taylor",
        "resnet10-3d-backtrace",
        "shallow-2d-ig",
        "resnet10-3d-lrp",
        "shallow-2d-magnitude",
    ],
)
def test_pruned_network_is_smaller_and_runs(build, method):
    torch.manual_seed(0)
    network, shape = build()
    network.train()
    before = _state(network)
    loader = _loader(shape, batches=1)
    pruned = prune_by_relevance(network, loader, 0.5, method=method)

    assert pruned is not network
    _assert_unchanged(network, before)
    assert network.training and pruned.training  # mode kept
    assert count_parameters(pruned) < 0.6 * count_parameters(network)
    assert count_macs(pruned, shape[1:]) < 0.7 * count_macs(network, shape[1:])
    head = [m for m in network.modules() if isinstance(m, nn.Linear)][-1]
    pruned_head = [m for m in pruned.modules() if isinstance(m, nn.Linear)][-1]
    assert pruned_head.out_features == head.out_features == 3
    assert pruned_head.in_features < head.in_features
    pruned.eval()
    with torch.no_grad():
        out = pruned(torch.randn(*shape))
    assert out.shape == (shape[0], 3) and torch.isfinite(out).all()
    first = [m for m in pruned.modules() if isinstance(m, nn.modules.conv._ConvNd)][0]
    assert first.in_channels == 1  # the input is never pruned


def test_least_relevant_channels_are_removed():
    torch.manual_seed(0)
    network = ShallowCNN(2, 1, 3, channels=(8, 8), hidden=8, dropout=0.0).eval()
    generator = torch.Generator().manual_seed(1)
    relevance = {}
    for path, module in network.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            width = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
            relevance[path] = torch.randperm(width, generator=generator).float() + 1.0
    x = torch.randn(1, 1, 16, 16)
    pruned = prune_by_relevance(network, None, 0.5, relevance=relevance, example_inputs=x)

    def kept(scores):
        return sorted(torch.topk(scores, len(scores) // 2).indices.tolist())

    k0 = kept(relevance["blocks.0.0"])
    # blocks.1.0 is coupled with the residual block's last conv (x + body(x)): their relevances add up
    k1 = kept(relevance["blocks.1.0"] + relevance["residual.body.3"])
    kr = kept(relevance["residual.body.0"])
    kh = kept(relevance["head.1"])
    assert k0 != list(range(4))  # the test is not trivially satisfied by keeping the first channels
    orig, new = dict(network.named_modules()), dict(pruned.named_modules())
    torch.testing.assert_close(new["blocks.0.0"].weight, orig["blocks.0.0"].weight[k0], rtol=0, atol=0)
    torch.testing.assert_close(new["blocks.1.0"].weight, orig["blocks.1.0"].weight[k1][:, k0], rtol=0, atol=0)
    torch.testing.assert_close(new["residual.body.0"].weight, orig["residual.body.0"].weight[kr][:, k1], rtol=0, atol=0)
    torch.testing.assert_close(new["residual.body.3"].weight, orig["residual.body.3"].weight[k1][:, kr], rtol=0, atol=0)
    torch.testing.assert_close(new["blocks.0.1"].running_mean, orig["blocks.0.1"].running_mean[k0], rtol=0, atol=0)
    torch.testing.assert_close(new["head.1"].weight, orig["head.1"].weight[kh][:, k1], rtol=0, atol=0)
    torch.testing.assert_close(new["head.4"].weight, orig["head.4"].weight[:, kh], rtol=0, atol=0)  # head kept


def test_global_iterative_and_per_layer_ratios():
    network, shape = _shallow()
    loader = _loader(shape)
    glob = prune_by_relevance(network, loader, 0.5, method="taylor", global_pruning=True, iterative_steps=2)
    assert count_parameters(glob) < count_parameters(network)
    glob(torch.randn(*shape))
    only = prune_by_relevance(network, loader, {"blocks.1": 0.5}, method="lrp")
    assert only.blocks[1][0].out_channels == 4
    assert only.blocks[0][0].out_channels == network.blocks[0][0].out_channels
    assert only.head[1].out_features == network.head[1].out_features


def test_check_prunable_lists_groups_without_head():
    network, shape = _shallow()
    roots = check_prunable(network, torch.randn(1, *shape[1:]))
    assert "blocks.0.0" in roots and "head.1" in roots and "head.4" not in roots


# ----------------------------------------------------------------------------------------------------------------------
# relevance methods
# ----------------------------------------------------------------------------------------------------------------------
def test_registry_lists_every_method():
    assert {"lrp", "ig", "taylor", "backtrace", "magnitude", "random"} <= set(RELEVANCE_METHODS.names())


def test_taylor_equals_hand_computation():
    network = _tiny_sequential(bias=True)
    loader = _loader((3, 1, 8, 8), batches=1, kind="pair")
    x, y = loader[0]
    got = collect_relevance(network, loader, method="taylor")

    acts = {}
    handles = [network[i].register_forward_hook(lambda m, i, o, k=str(i): acts.__setitem__(k, o)) for i in (0, 2, 6)]
    logits = network(x)
    for handle in handles:
        handle.remove()
    grads = torch.autograd.grad(logits[torch.arange(3), y].sum(), [acts["0"], acts["2"], acts["6"]])
    for key, act, grad in zip(["0", "2", "6"], [acts["0"], acts["2"], acts["6"]], grads, strict=True):
        expected = (act * grad).flatten(2).sum(-1).abs().sum(0) if act.ndim > 2 else (act * grad).abs().sum(0)
        torch.testing.assert_close(got[key], expected.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", [LRPRelevance(absolute=False), BacktraceRelevance(absolute=False)])
def test_lrp_and_backtrace_conserve_relevance(method):
    network = _tiny_sequential(bias=False)
    loader = _loader((2, 1, 8, 8), batches=1)
    signed = collect_relevance(network, loader, method=method)
    for path in ("0", "2", "6"):  # every layer carries the unit relevance of each of the 2 samples
        assert signed[path].sum().item() == pytest.approx(2.0, abs=1e-3)


def test_lrp_is_non_negative_and_conserved_through_densenet():
    torch.manual_seed(0)
    network = densenet_student(2, 1, 3, block_config=(2, 2), init_features=8, growth_rate=4).eval()
    loader = _loader((3, 1, 16, 16), batches=1)
    before = _state(network)
    relevance = collect_relevance(network, loader, method="lrp")
    assert all((value >= 0).all() for value in relevance.values())
    # the stem convolution is a cut of the network: it carries each sample's unit relevance (BN folded, concat split)
    signed = collect_relevance(network, loader, method=LRPRelevance(absolute=False))
    assert signed["features.conv0"].sum().item() == pytest.approx(3.0, rel=1e-3)
    _assert_unchanged(network, before)  # the batch norms folded by the canonizer are restored


def test_backtrace_conserves_through_residual_block():
    torch.manual_seed(0)
    network = ShallowCNN(2, 1, 3, channels=(4, 8), hidden=8, dropout=0.0).eval()
    signed = collect_relevance(network, _loader((2, 1, 16, 16), batches=1), method=BacktraceRelevance(absolute=False))
    for path in ("blocks.0.0", "blocks.1.0", "head.1", "head.4"):
        assert signed[path].sum().item() == pytest.approx(2.0, abs=1e-3), path


@pytest.mark.parametrize("dims", [2, 3])
def test_lrp_relevance_is_conserved_across_monai_resnet_residual_blocks(dims):
    """Pruning relevance runs on the explanations' LRP backend, with its residual canonizer: relevance is split
    between a block's branch and its shortcut instead of copied to both (before: 7x the logit at the stem)."""
    from monai.networks.nets import resnet10

    torch.manual_seed(0)
    network = resnet10(spatial_dims=dims, n_input_channels=1, num_classes=3).eval()
    loader = _loader((3, 1, *[16] * dims), batches=1)
    conserving = LRPRelevance(composite_kwargs={"zero_bias": True}, absolute=False)
    exact = collect_relevance(network, loader, method=conserving)
    assert exact["conv1"].sum().item() == pytest.approx(3.0, rel=1e-3)  # the stem carries each sample's unit
    for layer in ("layer2", "layer3", "layer4"):  # branch + shortcut of a downsampling block = the whole relevance
        total = exact[f"{layer}.0.conv2"].sum() + exact[f"{layer}.0.downsample.0"].sum()
        assert total.item() == pytest.approx(3.0, rel=1e-3), layer
    default = collect_relevance(network, loader, method=LRPRelevance(absolute=False))
    assert 0 < default["conv1"].sum().item() < 3.0 + 1e-3  # biases absorb some, nothing is copied


def test_ig_is_layer_conductance_of_captum():
    from captum.attr import LayerConductance

    network = _tiny_sequential(bias=True)
    loader = _loader((3, 1, 8, 8), batches=1, kind="pair")
    x, y = loader[0]
    got = collect_relevance(network, loader, method=IntegratedGradientsRelevance(n_steps=6))
    chunked = collect_relevance(network, loader, method=IntegratedGradientsRelevance(n_steps=6, internal_batch_size=4))
    for index in (0, 2):
        reference = LayerConductance(network, network[index]).attribute(
            x, target=y, n_steps=6, method="riemann_trapezoid"
        )
        torch.testing.assert_close(got[str(index)], reference.abs().sum((0, 2, 3)), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(chunked[str(index)], got[str(index)], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", DATA_METHODS)
def test_accumulation_and_data_dependence(method):
    network = _tiny_sequential(bias=True)
    first, second = _loader((2, 1, 8, 8), batches=2, seed=3)
    both = collect_relevance(network, [first, second], method=method)
    one = collect_relevance(network, [first], method=method)
    two = collect_relevance(network, [second], method=method)
    limited = collect_relevance(network, [first, second], method=method, max_batches=1)
    other = collect_relevance(network, _loader((2, 1, 8, 8), batches=1, seed=99), method=method)
    for path in both:
        torch.testing.assert_close(both[path], one[path] + two[path], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(limited[path], one[path])
    assert any(not torch.allclose(one[path], other[path]) for path in one)


def test_per_class_and_predicted_target():
    network = _tiny_sequential(bias=True)
    image = torch.randn(4, 1, 8, 8)
    loader = [{"image": image, "label": torch.tensor([[0], [2], [2], [0]])}]  # (B, 1) labels
    total = collect_relevance(network, loader, method="taylor")
    per_class = collect_relevance(network, loader, method="taylor", per_class=True)
    assert per_class["2"].shape == (3, 6)
    assert torch.all(per_class["2"][1] == 0)  # no sample of class 1
    torch.testing.assert_close(per_class["2"].sum(0), total["2"])
    predicted = network(image).argmax(1)
    pred = collect_relevance(network, [image], method="taylor", target="pred")  # bare tensors: no labels needed
    by_label = collect_relevance(network, [(image, predicted)], method="taylor")
    torch.testing.assert_close(pred["2"], by_label["2"])
    with pytest.raises(ValueError, match="target='label' needs labelled batches"):
        collect_relevance(network, [image], method="taylor")


def test_data_free_baselines():
    network = _tiny_sequential(bias=True)
    magnitude = collect_relevance(network, None, method="magnitude")
    torch.testing.assert_close(magnitude["2"], network[2].weight.abs().sum((1, 2, 3)))
    assert torch.equal(collect_relevance(network, None, "random")["2"], collect_relevance(network, None, "random")["2"])


# ----------------------------------------------------------------------------------------------------------------------
# no side effects
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", [*DATA_METHODS, "magnitude"])
def test_no_hooks_grads_or_modes_changed(method):
    torch.manual_seed(0)
    network = ShallowCNN(2, 1, 3, channels=(4, 8), hidden=8)
    network.train()
    network.blocks[0][1].eval()  # mixed modes must come back exactly
    for parameter in network.parameters():
        parameter.grad = torch.full_like(parameter, 7.0)
    network.head[1].weight.grad = None
    modes = [m.training for m in network.modules()]
    before = _state(network)
    loader = _loader((2, 1, 16, 16), batches=1)
    collect_relevance(network, loader, method=method)
    prune_by_relevance(network, loader, 0.25, method=method)
    assert _no_hooks(network)
    assert [m.training for m in network.modules()] == modes
    assert network.head[1].weight.grad is None
    assert all(p.grad is None or torch.all(p.grad == 7.0) for p in network.parameters())
    _assert_unchanged(network, before)


# ----------------------------------------------------------------------------------------------------------------------
# bad input: a clear error, the network untouched
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"ratio": 0.0}, ValueError, r"ratio must be in \(0, 1\)"),
        ({"ratio": 1.0}, ValueError, r"ratio must be in \(0, 1\)"),
        ({"ratio": -0.2}, ValueError, r"ratio must be in \(0, 1\)"),
        ({"ratio": "half"}, TypeError, "ratio must be a float"),
        ({"ratio": 0.6}, ValueError, "would leave layer 'blocks.0.0'"),
        ({"ratio": 0.5, "calibration_loader": []}, ValueError, "calibration loader is empty"),
        ({"ratio": 0.5, "method": "lrpp"}, KeyError, "lrp"),
        ({"ratio": 0.5, "calibration_loader": iter([])}, TypeError, "re-iterable"),
        ({"ratio": {"blocks.9": 0.5}}, ValueError, "no submodule 'blocks.9'"),
        ({"ratio": 0.5, "iterative_steps": 0}, ValueError, "iterative_steps"),
    ],
    ids=[
        "zero",
        "one",
        "negative",
        "string",
        "empties-layer",
        "empty-loader",
        "unknown-method",
        "iterator",
        "unknown-layer",
        "steps",
    ],
)
def test_bad_input_leaves_network_unchanged(kwargs, error, match):
    torch.manual_seed(0)
    network = ShallowCNN(2, 1, 3, channels=(2, 8), hidden=8)  # blocks.0.0 has only 2 channels
    before = _state(network)
    parameters = list(network.parameters())
    kwargs = {"calibration_loader": _loader((2, 1, 16, 16), batches=1), **kwargs}
    with pytest.raises(error, match=match):
        prune_by_relevance(network, **kwargs)
    _assert_unchanged(network, before)
    assert all(a is b for a, b in zip(parameters, network.parameters(), strict=True))
    assert _no_hooks(network)


def test_unet_with_residual_units_is_rejected():
    network = UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2), num_res_units=2)
    before = _state(network)
    with pytest.raises(ValueError, match="MONAI UNet with residual units is not supported.*'model.0'"):
        prune_by_relevance(network, [(torch.randn(1, 1, 32, 32), torch.tensor([0]))], 0.5, method="magnitude")
    _assert_unchanged(network, before)
    with pytest.raises(ValueError, match="MONAI UNet with residual units"):
        check_prunable(network, torch.randn(1, 1, 32, 32))
    plain = UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2), num_res_units=0)
    with pytest.raises(ValueError, match="not supported by Torch-Pruning's dependency graph at layer"):
        check_prunable(plain, torch.randn(1, 1, 32, 32))


# ----------------------------------------------------------------------------------------------------------------------
# persistence
# ----------------------------------------------------------------------------------------------------------------------
def test_save_and_load_in_a_fresh_process(tmp_path, subprocess_env):
    builder = {
        "network": "densenet_student",
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 2,
        "block_config": [2, 2],
        "init_features": 8,
        "growth_rate": 4,
    }
    torch.manual_seed(0)
    network = densenet_student(3, 1, 2, block_config=(2, 2), init_features=8, growth_rate=4)
    pruned = prune_by_relevance(network, _loader((2, 1, 16, 16, 16), classes=2, batches=1), 0.5, builder=builder)
    pruned.eval()
    path = tmp_path / "pruned.pt"
    save_pruned(pruned, path)  # builder recorded by prune_by_relevance
    assert sorted(os.listdir(tmp_path)) == ["pruned.pt"]  # no temporary file left
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "monai_kdx.pruned/1" and payload["builder"] == builder

    x = torch.randn(2, 1, 16, 16, 16)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        expected = pruned(x)
    code = (
        "import sys, torch; from monai_kdx.pruning import load_pruned; m = load_pruned(sys.argv[1]); "
        "assert not m.training; x = torch.load(sys.argv[2], weights_only=True); "
        "torch.save(m(x).detach(), sys.argv[3])"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
        check=True,
        env={**subprocess_env, "OMP_NUM_THREADS": str(torch.get_num_threads())},  # same kernels as here
        timeout=120,
    )
    assert torch.equal(torch.load(tmp_path / "y.pt", weights_only=True), expected)
    reloaded = load_pruned(path)
    assert count_parameters(reloaded) == count_parameters(pruned) < count_parameters(network)


def test_persistence_errors(tmp_path):
    network, shape = _shallow()
    with pytest.raises(ValueError, match="needs builder"):
        save_pruned(network, tmp_path / "a.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_pruned(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="corrupt.pt"):
        load_pruned(corrupt)
    other = tmp_path / "other.pt"
    torch.save({"model": {}}, other)
    with pytest.raises(ValueError, match="other.pt.*monai_kdx.pruned/1"):
        load_pruned(other)
    builder = {
        "_target_": "monai_kdx.networks.ShallowCNN",
        "spatial_dims": 2,
        "in_channels": 1,
        "out_channels": 3,
        "channels": [4, 8, 8],
        "hidden": 8,
    }
    pruned = prune_by_relevance(network, _loader(shape, batches=1), 0.5, method="magnitude")
    saved = save_pruned(pruned, tmp_path / "sub" / "shallow.pt", builder=builder)
    copy_ = load_pruned(saved)
    pruned.eval()
    copy_.eval()
    x = torch.randn(*shape)
    assert torch.equal(copy_(x), pruned(x))
    wrong = dict(builder, channels=[4, 8])  # a different module tree
    save_pruned(pruned, tmp_path / "wrong.pt", builder=wrong)
    with pytest.raises(ValueError, match="wrong.pt"):
        load_pruned(tmp_path / "wrong.pt")


_DDP_SCRIPT = """
import sys, torch, torch.distributed as dist
from torch import nn
from monai_kdx.pruning import collect_relevance
rank, world, init, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
g = torch.Generator().manual_seed(rank)
batch = (torch.randn(2, 1, 8, 8, generator=g), torch.randint(0, 3, (2,), generator=g))
torch.save({"relevance": collect_relevance(net, [batch], method="taylor"), "batch": batch}, out)
dist.destroy_process_group()
"""


def test_relevance_is_summed_over_ranks(tmp_path, subprocess_env):
    env = {**subprocess_env, "OMP_NUM_THREADS": "1"}
    init = f"file://{tmp_path / 'rendezvous'}"
    outs = [tmp_path / f"rank{rank}.pt" for rank in range(2)]
    workers = [
        subprocess.Popen([sys.executable, "-c", _DDP_SCRIPT, str(rank), "2", init, str(outs[rank])], env=env)
        for rank in range(2)
    ]
    assert [worker.wait(timeout=120) for worker in workers] == [0, 0]
    results = [torch.load(out, weights_only=True) for out in outs]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    single = collect_relevance(net, [results[0]["batch"], results[1]["batch"]], method="taylor")
    for path in single:
        torch.testing.assert_close(results[0]["relevance"][path], single[path], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(results[1]["relevance"][path], single[path], rtol=1e-5, atol=1e-6)
