"""RelevancePruningHandler on real MONAI SupervisedTrainers with tiny 2D and 3D data."""

from __future__ import annotations

import math

import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import LrScheduleHandler, ValidationHandler
from monai.networks.nets import DenseNet, UNet
from torch import nn

from monai_kdx.handlers.pruning import RelevancePruningHandler
from monai_kdx.metrics import explanation_agreement
from monai_kdx.networks import ShallowCNN, count_macs, count_parameters
from monai_kdx.pruning import load_pruned

BUILDER_2D = {"_target_": "monai_kdx.networks.ShallowCNN", "spatial_dims": 2, "in_channels": 1, "out_channels": 2,
              "channels": [8, 16], "hidden": 0}  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def _data(spatial, n=16, batch=4, seed=0):
    """Learnable toy task: class 1 has a bright blob in the first quadrant/octant. List of MONAI dict batches."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n // batch):
        image = torch.randn(batch, 1, *spatial, generator=generator) * 0.3
        label = torch.randint(0, 2, (batch,), generator=generator)
        corner = tuple(slice(0, s // 2) for s in spatial)
        for i in (label == 1).nonzero().flatten().tolist():
            image[(i, slice(None), *corner)] += 2.0
        batches.append({"image": image, "label": label})
    return batches


def _net_2d(seed=0):
    torch.manual_seed(seed)
    return ShallowCNN(2, 1, 2, channels=(8, 16), hidden=0, dropout=0.0)


def _trainer(network, loader, max_epochs=3, handlers=(), lr=0.01, scheduler=False):
    optimizer = torch.optim.Adam(network.parameters(), lr=lr, weight_decay=1e-4)
    train_handlers = list(handlers)
    if scheduler:
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        train_handlers.insert(0, LrScheduleHandler(schedule, print_lr=False))
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=max_epochs,
        train_data_loader=loader,
        network=network,
        optimizer=optimizer,
        loss_function=nn.CrossEntropyLoss(),
        train_handlers=train_handlers,
    )
    return trainer, optimizer


def _accuracy(network, loader):
    network.eval()
    with torch.no_grad():
        correct = sum(int((network(b["image"]).argmax(1) == b["label"]).sum()) for b in loader)
    return correct / sum(len(b["label"]) for b in loader)


def _param_ids(network):
    return {id(p) for p in network.parameters()}


def test_2d_prunes_at_the_configured_epoch_rebuilds_optimizer_and_keeps_training(tmp_path):
    loader = _data((16, 16))
    network = _net_2d()
    original = count_parameters(network)
    handler = RelevancePruningHandler(loader, ratio=0.5, epochs=2, method="lrp", builder=BUILDER_2D, latency_repeats=2,
                                      save_path=str(tmp_path / "pruned.pt"))  # fmt: skip
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=loader, network=network)
    explicit = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=loader, network=network)
    handler.evaluators = [evaluator, explicit]  # every evaluator sharing the network is listed
    trainer, optimizer = _trainer(
        network, loader, handlers=[handler, ValidationHandler(1, evaluator, epoch_level=True)], scheduler=True
    )
    seen, losses, snapshots = {}, {}, {}

    @trainer.on(Events.EPOCH_STARTED)
    def _after_prune(engine):  # registered after the handler: sees the pruned network at epoch 2
        seen[engine.state.epoch] = (engine.network, count_parameters(engine.network), optimizer.param_groups[0]["lr"])
        snapshots[engine.state.epoch] = {k: v.clone() for k, v in engine.network.state_dict().items()}

    @trainer.on(Events.ITERATION_COMPLETED)
    def _loss(engine):
        losses.setdefault(engine.state.epoch, []).append(float(engine.state.output[0]["loss"]))

    trainer.run()
    assert seen[1][1] == original and seen[1][0] is network
    # the convolutions lose exactly half their output channels: the same architecture with (4, 8) channels
    expected = count_parameters(ShallowCNN(2, 1, 2, channels=(4, 8), hidden=0))
    assert seen[2][1] == expected < original and seen[3][1] == expected
    pruned = trainer.network
    assert pruned is seen[2][0] and pruned is not network
    assert count_parameters(network) == original  # the caller's network object is untouched
    # the optimizer is the same object; its groups hold exactly the pruned network's parameters, same hyper-params
    assert trainer.optimizer is optimizer and len(optimizer.param_groups) == 1
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in pruned.parameters()]
    assert not (_param_ids(network) & {id(p) for p in optimizer.param_groups[0]["params"]})
    assert optimizer.param_groups[0]["weight_decay"] == 1e-4
    assert set(optimizer.state) <= set(pruned.parameters())  # no state of removed parameters left
    # the LR scheduler keeps driving the same optimizer: 0.01 → 0.005 → 0.0025
    assert [seen[e][2] for e in (1, 2, 3)] == pytest.approx([0.01, 0.005, 0.0025])
    # the listed evaluators (the one behind the ValidationHandler too) follow the pruned network
    assert evaluator.network is pruned and explicit.network is pruned
    # training continues on the pruned network: its weights change, the loss varies
    after = pruned.state_dict()
    assert any(not torch.equal(snapshots[2][k], after[k]) for k in after if after[k].is_floating_point())
    assert len(set(losses[2] + losses[3])) > 1 and all(math.isfinite(v) for v in losses[3])
    # metrics: hand counts of parameters/MACs, hand accuracy of the network before pruning
    metrics = trainer.state.metrics
    assert metrics["prune_params_before"] == seen[1][1] and metrics["prune_params"] == expected
    assert metrics["prune_macs"] == count_macs(ShallowCNN(2, 1, 2, channels=(4, 8), hidden=0), (1, 16, 16))
    assert metrics["prune_macs_before"] == count_macs(_net_2d(), (1, 16, 16))
    assert metrics["prune_macs"] < 0.5 * metrics["prune_macs_before"]
    assert metrics["prune_steps"] == 1 and metrics["prune_stopped"] == 0
    assert -1.0 <= metrics["prune_agreement"] <= 1.0 and metrics["prune_latency_ms"] > 0
    (step,) = handler.report
    assert step["epoch"] == 2 and step["accepted"] and step["params_after"] == expected
    # the saved file (written at COMPLETED) is the final pruned network
    loaded = load_pruned(tmp_path / "pruned.pt").eval()
    probe = loader[0]["image"]
    pruned.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(probe), pruned(probe))
    assert count_parameters(loaded) == expected


def test_accuracy_before_matches_hand_computation_and_second_step_prunes_again():
    loader = _data((16, 16), n=12, batch=4, seed=3)
    network = _net_2d(seed=1)
    hand = _accuracy(network, loader)
    network.train()
    handler = RelevancePruningHandler(loader, ratio=[0.5, 0.5], epochs=[1, 2], method="taylor", latency_repeats=0,
                                      gate_batches=0)  # fmt: skip
    widths = {}
    trainer, _ = _trainer(network, loader, max_epochs=2, handlers=[handler])

    @trainer.on(Events.EPOCH_STARTED)
    def _width(engine):
        widths[engine.state.epoch] = engine.network.blocks[0][0].out_channels

    trainer.run()
    assert handler.report[0]["accuracy_before"] == pytest.approx(hand)
    assert widths == {1: 4, 2: 2}  # 8 → 4 → 2 channels
    assert math.isnan(handler.report[0]["latency_ms_before"]) and "prune_agreement" not in trainer.state.metrics


def test_gate_discards_the_step_and_stops_pruning():
    loader = _data((16, 16))
    network = _net_2d()
    original = count_parameters(network)
    # explanations of a pruned network are never identical to the original ones: agreement < 1 stops pruning
    handler = RelevancePruningHandler(loader, ratio=0.5, epochs=[1, 2], method="magnitude", min_agreement=1.0,
                                      latency_repeats=0)  # fmt: skip
    trainer, optimizer = _trainer(network, loader, max_epochs=2, handlers=[handler])
    trainer.run()
    assert trainer.network is network and count_parameters(network) == original
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in network.parameters()]
    assert len(handler.report) == 1 and not handler.report[0]["accepted"]  # epoch 2 never tried
    assert "agreement" in handler.report[0]["reason"] and handler.stopped
    assert trainer.state.metrics["prune_stopped"] == 1 and trainer.state.metrics["prune_params"] == original
    # an accuracy gate the pruned copy cannot pass
    network = _net_2d()
    handler = RelevancePruningHandler(loader, ratio=0.5, epochs=1, method="magnitude", min_accuracy=1.0,
                                      gate_batches=0, latency_repeats=0)  # fmt: skip
    trainer, _ = _trainer(network, loader, max_epochs=1, handlers=[handler])
    trainer.run()
    assert handler.report[0]["accuracy_after"] < 1.0  # an untrained pruned network on 16 random-ish samples
    assert not handler.report[0]["accepted"] and trainer.network is network
    assert "accuracy" in handler.report[0]["reason"] and trainer.state.metrics["prune_steps"] == 0
    # a gate that passes keeps the step, and the agreement equals a hand computation on the same CAMs
    network = _net_2d()
    handler = RelevancePruningHandler(loader, ratio=0.5, epochs=1, method="magnitude", min_agreement=-1.0,
                                      min_accuracy=0.0, latency_repeats=0)  # fmt: skip
    trainer, _ = _trainer(network, loader, max_epochs=1, handlers=[handler])
    captured = {}

    @trainer.on(Events.EPOCH_STARTED)
    def _capture(engine):
        captured["net"] = {k: v.clone() for k, v in engine.network.state_dict().items()}

    trainer.run()
    assert handler.report[0]["accepted"] and count_parameters(trainer.network) < count_parameters(network)
    from monai_kdx.explain import HierarchicalCAM

    pruned = ShallowCNN(2, 1, 2, channels=(4, 8), hidden=0, dropout=0.0)
    pruned.load_state_dict(captured["net"])
    maps = [HierarchicalCAM(n).cam(loader[0]["image"], loader[0]["label"]).fused for n in (network, pruned)]
    hand = float(explanation_agreement(*maps).mean())
    assert handler.report[0]["agreement"] == pytest.approx(hand, abs=1e-5)


def test_3d_densenet_pruned_and_fine_tuned():
    loader = _data((12, 12, 12), n=8, batch=4)
    torch.manual_seed(0)
    network = DenseNet(3, 1, 2, init_features=8, growth_rate=4, block_config=(2, 2), bn_size=2)
    original = count_parameters(network)
    handler = RelevancePruningHandler(loader, ratio=0.5, epochs=1, method="lrp", latency_repeats=1)
    trainer, optimizer = _trainer(network, loader, max_epochs=2, handlers=[handler])
    trainer.run()
    pruned = trainer.network
    assert count_parameters(pruned) < 0.5 * original
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in pruned.parameters()]
    assert pruned(loader[0]["image"]).shape == (4, 2)
    assert trainer.state.metrics["prune_macs"] < trainer.state.metrics["prune_macs_before"]


def _bad(**kwargs):
    return {"calibration_loader": _data((16, 16), n=4), **kwargs}


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (_bad(ratio=1.0), ValueError, r"ratio must be in \(0, 1\)"),
        (_bad(ratio=0.0), ValueError, r"ratio must be in \(0, 1\)"),
        (_bad(ratio=[0.5, 0.5]), ValueError, "ratio has 2 entries but epochs has 1"),
        (_bad(epochs=0), ValueError, "1-based"),
        (_bad(method="nope"), KeyError, "nope"),
        (_bad(min_accuracy=2.0), ValueError, "min_accuracy"),
        (_bad(min_agreement=0.5, gate_batches=0), ValueError, "gate_batches"),
        (_bad(agreement_method="xyz"), ValueError, "agreement_method"),
        (_bad(calibration_loader=iter(_data((16, 16), n=4))), TypeError, "re-iterable"),
        (_bad(builder={"no": "target"}), TypeError, "builder"),
    ],
)
def test_bad_configuration_fails_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        RelevancePruningHandler(**kwargs)


def _snapshot(network):
    return {k: v.clone() for k, v in network.state_dict().items()}


@pytest.mark.parametrize(
    "network, kwargs, match",
    [
        (_net_2d(), {"epochs": 5}, r"beyond the trainer's max_epochs \(2\)"),
        (_net_2d(), {"calibration_loader": []}, "calibration loader is empty"),
        (_net_2d(), {"ratio": 0.9}, "would leave layer 'blocks.0.0'"),  # 8 channels × 0.1 < 1
        (_net_2d(), {"ratio": [0.6, 0.6, 0.6, 0.6], "epochs": [1, 2, 3, 4]}, "beyond"),
        (_net_2d(), {"save_path": "x.pt"}, "save_path needs builder"),
        (
            UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=1),
            {},
            "MONAI UNet with residual units is not supported",
        ),
    ],
)
def test_bad_configuration_fails_at_attach_before_training(network, kwargs, match):
    loader = _data((16, 16), n=4)
    kwargs = {"calibration_loader": loader, **kwargs}
    before = _snapshot(network)
    handler = RelevancePruningHandler(method="magnitude", **kwargs)
    ran = []
    with pytest.raises(ValueError, match=match):
        trainer, _ = _trainer(network, loader, max_epochs=2, handlers=[handler])
        trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: ran.append(1))
        trainer.run()
    assert not ran
    after = network.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_ratio_leaving_a_layer_without_channels_over_several_steps_fails_at_attach():
    loader = _data((16, 16), n=4)
    handler = RelevancePruningHandler(loader, ratio=0.7, epochs=[1, 2], method="magnitude")
    trainer, _ = _trainer(_net_2d(), loader, max_epochs=2, handlers=[handler])
    with pytest.raises(ValueError, match="no channels"):  # 8 → 30% → 9%: int(8 * 0.09) = 0
        trainer.run()
    assert not handler.report


def test_refuses_evaluators_and_engines_without_optimizer():
    loader = _data((16, 16), n=4)
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=loader, network=_net_2d())
    with pytest.raises(ValueError, match="not to an evaluator"):
        RelevancePruningHandler(loader).attach(evaluator)
    from ignite.engine import Engine

    with pytest.raises(ValueError, match="no `network`"):
        RelevancePruningHandler(loader).attach(Engine(lambda e, b: None))


_DDP_SCRIPT = """
import sys, torch, torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from monai.engines import SupervisedTrainer
from monai_kdx.handlers.pruning import RelevancePruningHandler
from monai_kdx.networks import ShallowCNN
rank, init, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
torch.manual_seed(0)  # same initial weights on both ranks, different data
network = DistributedDataParallel(ShallowCNN(2, 1, 2, channels=(8, 16), hidden=0, dropout=0.0))
g = torch.Generator().manual_seed(10 + rank)
loader = [{"image": torch.randn(4, 1, 16, 16, generator=g), "label": torch.randint(0, 2, (4,), generator=g)}]
optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
handler = RelevancePruningHandler(loader, ratio=0.5, epochs=1, method="taylor", gate_batches=0, latency_repeats=0)
trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=2, train_data_loader=loader, network=network,
                            optimizer=optimizer, loss_function=nn.CrossEntropyLoss(), train_handlers=[handler])
trainer.run()
net = trainer.network
assert isinstance(net, DistributedDataParallel), type(net)
assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in net.module.parameters()]
torch.save({k: v for k, v in net.module.state_dict().items()}, out)
dist.destroy_process_group()
# skip interpreter teardown: under load, a gloo/DDP background thread still joinable at exit occasionally
# aborts the process ("terminate called without an active exception") after all the work above is done
import os
os._exit(0)
"""


@pytest.mark.slow
def test_ddp_two_ranks_prune_the_same_channels_and_keep_training_in_sync(tmp_path, subprocess_env):
    """Relevance is summed over ranks, so both ranks remove the same channels from different data; the pruned
    network is re-wrapped in DistributedDataParallel and gradients stay synchronized (identical final weights)."""
    import subprocess
    import sys

    env = {**subprocess_env, "OMP_NUM_THREADS": "1"}
    init = f"file://{tmp_path / 'rendezvous'}"
    outs = [tmp_path / f"rank{rank}.pt" for rank in range(2)]
    workers = [
        subprocess.Popen([sys.executable, "-c", _DDP_SCRIPT, str(rank), init, str(outs[rank])], env=env)
        for rank in range(2)
    ]
    assert [worker.wait(timeout=180) for worker in workers] == [0, 0]
    states = [torch.load(out, weights_only=True) for out in outs]
    assert states[0]["blocks.0.0.weight"].shape[0] == 4  # 8 → 4 channels
    for key in states[0]:
        if "running_" not in key and "num_batches" not in key:  # BN statistics are rank-local between broadcasts
            torch.testing.assert_close(states[0][key], states[1][key])


def test_distillation_trainer_student_is_pruned_and_its_feature_capture_follows():
    from monai_kdx.engines import DistillationTrainer
    from monai_kdx.losses import AttentionTransferLoss, DistillationLoss, KnowledgeDistillationLoss

    loader = _data((16, 16))
    torch.manual_seed(0)
    teacher = ShallowCNN(2, 1, 2, channels=(16, 32), hidden=0, dropout=0.0)
    student = _net_2d()
    loss = DistillationLoss(
        {"logits": KnowledgeDistillationLoss(4.0, 0.5), "attention": AttentionTransferLoss(["blocks.1"], ["blocks.1"])}
    )
    optimizer = torch.optim.Adam(student.parameters(), lr=0.01)
    handler = RelevancePruningHandler(loader, ratio=0.5, epochs=2, method="taylor", gate_batches=0, latency_repeats=0)
    trainer = DistillationTrainer(device=torch.device("cpu"), max_epochs=3, train_data_loader=loader, network=student,
                                  teacher_network=teacher, loss_function=loss, optimizer=optimizer,
                                  train_handlers=[handler])  # fmt: skip
    attention = []

    @trainer.on(Events.ITERATION_COMPLETED)
    def _record(engine):
        attention.append((engine.state.epoch, float(engine.state.output[0]["attention"])))

    trainer.run()
    pruned = trainer.network
    assert count_parameters(pruned) < count_parameters(student)
    capture = trainer._distill_inferer.student_capture
    assert capture.modules["blocks.1"] is pruned.blocks[1]  # hooks the pruned student, not the original
    after = [value for epoch, value in attention if epoch >= 2]
    assert after and all(math.isfinite(v) and v > 0 for v in after)  # attention from the pruned student's features
    assert sum(len(m._forward_hooks) for m in [*pruned.modules(), *student.modules(), *teacher.modules()]) == 0
