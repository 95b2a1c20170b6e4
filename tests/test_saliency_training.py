"""Saliency-guided training through the real MONAI trainers: SaliencyGuidance on SupervisedTrainer and
DistillationTrainer, compared with a plain loop computing the same loss by hand; gradients, cleanup,
flat host memory, and errors before any training."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events
from monai.engines import SupervisedEvaluator, SupervisedTrainer

from monai_kdx.engines import DistillationTrainer
from monai_kdx.handlers import SaliencyGuidance
from monai_kdx.losses import (
    DistillationLoss,
    GAINLoss,
    KnowledgeDistillationLoss,
    RightForTheRightReasonsLoss,
    SaliencyAlignmentLoss,
)
from monai_kdx.networks import ShallowCNN


def _batch(spatial_dims: int, batch: int = 3, size: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Images, labels and a gaze map per image (one with no annotation: an all-zero map)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, 1, *[size] * spatial_dims)
    gaze = torch.rand(shape, generator=generator) ** 4
    gaze[-1] = 0.0
    return {
        "image": torch.randn(shape, generator=generator),
        "label": torch.arange(batch) % 3,
        "gaze": gaze,
    }


def _net(spatial_dims: int, seed: int = 0) -> ShallowCNN:
    torch.manual_seed(seed)
    return ShallowCNN(spatial_dims, 1, 3, channels=(4, 8, 8), dropout=0.0)  # deterministic forward


def _trainer(network, data, loss_function=None, lr=0.0, handlers=(), max_epochs=1, **kwargs) -> SupervisedTrainer:
    return SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=max_epochs,
        train_data_loader=data,
        network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=lr),
        loss_function=loss_function or torch.nn.CrossEntropyLoss(),
        train_handlers=list(handlers),
        decollate=False,
        **kwargs,
    )


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize(
    "make_loss",
    [
        lambda: SaliencyAlignmentLoss("blocks.1", method="gradcam", divergence="kl"),
        lambda: SaliencyAlignmentLoss(method="input_gradient", divergence="cc"),
        lambda: RightForTheRightReasonsLoss(weight=10.0),
        lambda: GAINLoss("blocks.1"),
    ],
    ids=["gradcam-kl", "input-gradient-cc", "rrr", "gain"],
)
def test_trainer_loss_and_gradients_equal_a_hand_written_loop(spatial_dims, make_loss):
    """One SupervisedTrainer iteration with the handler gives the loss and the weight gradients of
    ``CE + 0.5 · saliency loss`` computed by hand on the same batch, and the saliency term changes them."""
    batch = _batch(spatial_dims)
    network = _net(spatial_dims)
    guidance = SaliencyGuidance(make_loss(), target_key="gaze", weight=0.5)
    trainer = _trainer(network, [batch], handlers=[guidance])
    trainer.run()  # lr = 0: the weights stay as they were, the gradients are left in .grad
    output = trainer.state.output
    trainer_grads = [p.grad.clone() for p in network.parameters()]

    loss = make_loss()
    network.zero_grad()
    context = loss.context(network, batch["image"], batch["label"], batch["gaze"])
    task = F.cross_entropy(context.logits, batch["label"])
    saliency = loss.from_context(context)
    (task + 0.5 * saliency).backward()
    assert output["saliency"].item() == pytest.approx(saliency.item(), rel=1e-4, abs=1e-6)
    assert output["loss"].item() == pytest.approx((task + 0.5 * saliency).item(), rel=1e-4)
    assert saliency.item() != 0.0
    for ours, expected in zip(trainer_grads, network.parameters(), strict=True):
        torch.testing.assert_close(ours, expected.grad, rtol=1e-4, atol=1e-6)

    network.zero_grad()
    F.cross_entropy(network(batch["image"]), batch["label"]).backward()  # the task loss alone
    changed = [
        not torch.allclose(a, p.grad, atol=1e-7) for a, p in zip(trainer_grads, network.parameters(), strict=True)
    ]
    assert sum(changed) >= len(changed) // 2  # the saliency gradient reaches the weights
    assert not guidance.holds_tensors
    assert not network._forward_hooks and not network._forward_pre_hooks


def test_training_lowers_the_divergence_to_gaze():
    """A few steps with only the saliency term (weight 1, task loss scaled to 0) lower the KL to gaze."""
    batch = _batch(2, batch=4, size=16)
    batch["gaze"][-1] = batch["gaze"][0]
    network = _net(2)
    loss = SaliencyAlignmentLoss("blocks.1", divergence="kl")

    def kl() -> float:
        return loss.from_context(loss.context(network, batch["image"], batch["label"], batch["gaze"])).item()

    before = kl()
    trainer = _trainer(
        network, [batch] * 30, loss_function=lambda pred, y: 0.0 * pred.sum(), lr=0.0,
        handlers=[SaliencyGuidance(loss, weight=1.0)],
    )  # fmt: skip
    trainer.optimizer = torch.optim.Adam(network.parameters(), lr=1e-2)
    trainer.run()
    assert kl() < 0.7 * before


def test_distillation_trainer_adds_the_saliency_term_to_every_distillation_part():
    batch = _batch(2)
    teacher, student = _net(2, seed=1).eval(), _net(2)
    kd = DistillationLoss({"logits": KnowledgeDistillationLoss(temperature=2.0, alpha=0.5)})
    guidance = SaliencyGuidance(SaliencyAlignmentLoss("blocks.2", divergence="nss"), weight=2.0)
    trainer = DistillationTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=[batch],
        network=student,
        teacher_network=teacher,
        loss_function=kd,
        optimizer=torch.optim.SGD(student.parameters(), lr=0.0),
        train_handlers=[guidance],
        decollate=False,
    )
    trainer.run()
    output = trainer.state.output
    assert {"task", "kd", "saliency", "loss"} <= set(output)
    assert output["loss"].item() == pytest.approx(
        (output["task"] + output["kd"] + 2.0 * output["saliency"]).item(), rel=1e-5
    )
    loss = SaliencyAlignmentLoss("blocks.2", divergence="nss")
    expected = loss.from_context(loss.context(student, batch["image"], batch["label"], batch["gaze"]))
    assert output["saliency"].item() == pytest.approx(expected.item(), rel=1e-4)  # the student's, not the teacher's
    assert all(p.grad is None for p in teacher.parameters())


def test_inference_is_unchanged_and_nothing_outlives_training():
    batch = _batch(3, size=12)
    network = _net(3)
    guidance = SaliencyGuidance(SaliencyAlignmentLoss("blocks.1"), weight=1.0)
    trainer = _trainer(network, [batch] * 2, lr=1e-2, handlers=[guidance])
    held = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: held.append(guidance.holds_tensors))
    trainer.run()
    assert held == [False, False]
    network.eval()
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=[batch], network=network, decollate=False
    )
    evaluator.run()
    with torch.no_grad():
        torch.testing.assert_close(evaluator.state.output["pred"], network(batch["image"]))
    with pytest.raises(ValueError, match="cannot attach to the evaluator"):
        guidance.attach(evaluator)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_host_memory_stays_flat_over_many_iterations(one_thread):
    """A known leak elsewhere: CAM graphs kept alive across iterations. 50 iterations after a warm-up
    must not grow the resident memory by more than 16 MiB (keeping one 0.25 MiB feature map per iteration
    already fails this)."""
    batch = _batch(2, batch=8, size=64)
    network = _net(2)
    guidance = SaliencyGuidance(SaliencyAlignmentLoss("blocks.1", divergence="kl"), weight=1.0)
    trainer = _trainer(network, [batch] * 10, lr=1e-3, handlers=[guidance], max_epochs=6)
    resident = []

    def measure(engine) -> None:
        gc.collect()
        resident.append(_rss_mib())

    trainer.add_event_handler(Events.EPOCH_COMPLETED, measure)
    trainer.run()  # epoch 1 is the warm-up (allocator pools, lazy initialisation); 50 iterations follow
    growth = resident[-1] - resident[0]
    assert trainer.state.iteration == 60
    assert growth < 16, f"resident memory grew by {growth:.1f} MiB over 50 iterations: {resident}"
    assert not guidance.holds_tensors


def test_bad_configuration_fails_before_training():
    batch = _batch(2)
    network = _net(2)
    before = [p.clone() for p in network.parameters()]
    trainer = _trainer(network, [batch], lr=1.0, handlers=[SaliencyGuidance(SaliencyAlignmentLoss("blocks.7"))])
    with pytest.raises(ValueError, match="no submodule 'blocks.7'"):
        trainer.run()  # checked when the trainer starts (MONAI attaches handlers before it sets `network`)
    assert trainer.state.iteration == 0
    assert all(torch.equal(a, b) for a, b in zip(before, network.parameters(), strict=True))
    trainer = _trainer(
        _net(2), [batch], handlers=[SaliencyGuidance(SaliencyAlignmentLoss("blocks.1"), target_key="mask")]
    )
    with pytest.raises(ValueError, match="no target map 'mask'"):
        trainer.run()
    wrong = dict(batch, gaze=batch["gaze"][:, :, :8])
    trainer = _trainer(_net(2), [wrong], handlers=[SaliencyGuidance(SaliencyAlignmentLoss("blocks.1"))])
    with pytest.raises(ValueError, match="no broadcasting"):
        trainer.run()
    with pytest.raises(ValueError, match="weight"):
        SaliencyGuidance(SaliencyAlignmentLoss("blocks.1"), weight=-1.0)
    with pytest.raises(ValueError, match="SaliencyLoss"):
        SaliencyGuidance(torch.nn.MSELoss())
    assert isinstance(SaliencyGuidance("rrr").loss, RightForTheRightReasonsLoss)  # by registered name


def test_start_epoch_trains_on_the_task_loss_alone_before_it():
    batch = _batch(2)
    network = _net(2)
    guidance = SaliencyGuidance(SaliencyAlignmentLoss("blocks.1"), weight=1.0, start_epoch=2)
    trainer = _trainer(network, [batch], lr=1e-3, handlers=[guidance], max_epochs=2)
    seen = []

    def record(engine) -> None:
        output = engine.state.output
        seen.append(
            ("saliency" in output, output["loss"].item(), F.cross_entropy(output["pred"], output["label"]).item())
        )

    trainer.add_event_handler(Events.ITERATION_COMPLETED, record)
    trainer.run()
    (first, loss1, ce1), (second, loss2, ce2) = seen
    assert not first and loss1 == pytest.approx(ce1, rel=1e-5)  # epoch 1: cross-entropy only
    assert second and loss2 > ce2 + 1e-3  # epoch 2: cross-entropy + saliency
    with pytest.raises(ValueError, match="start_epoch"):
        SaliencyGuidance(SaliencyAlignmentLoss("blocks.1"), start_epoch=0)


# ---------------------------------------------------------------- issue 14: NaN batches stop training, named


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_nan_image_or_target_map_stops_saliency_training_before_the_step(spatial_dims):
    """A NaN pixel gave a finite saliency loss with NaN gradients and training went on; now the iteration raises
    before the backward pass, naming the batch key and the sample, and the weights are untouched."""
    network = _net(spatial_dims)
    before = [p.clone() for p in network.parameters()]
    batch = _batch(spatial_dims)
    batch["image"].view(3, -1)[1, 7] = float("nan")
    guidance = SaliencyGuidance(SaliencyAlignmentLoss("blocks.1"), target_key="gaze")
    trainer = _trainer(network, [batch], lr=1.0, handlers=[guidance])
    with pytest.raises(ValueError, match=r"batch\['image'\] has NaN or infinite values \(samples \[1\]\)"):
        trainer.run()
    assert all(torch.equal(a, b) for a, b in zip(before, network.parameters(), strict=True))
    assert not guidance.holds_tensors
    batch = _batch(spatial_dims)
    batch["gaze"].view(3, -1)[0, 3] = float("inf")
    trainer = _trainer(network, [batch], lr=1.0, handlers=[SaliencyGuidance(SaliencyAlignmentLoss("blocks.1"))])
    with pytest.raises(ValueError, match=r"batch\['gaze'\] contains NaN or infinite values \(samples \[0\]\)"):
        trainer.run()
    assert all(torch.equal(a, b) for a, b in zip(before, network.parameters(), strict=True))


def _files_loader(spatial_dims: int, nan_case: int):
    """A MONAI DataLoader over 4 MetaTensor images named case_0..case_3 (batches of 2), one of them holding a NaN."""
    from monai.data import DataLoader, MetaTensor

    generator = torch.Generator().manual_seed(0)
    items = []
    for index in range(4):
        image = torch.randn(1, *[8] * spatial_dims, generator=generator)
        if index == nan_case:
            image.view(-1)[5] = float("nan")
        items.append({"image": MetaTensor(image, meta={"filename_or_obj": f"case_{index}.nii.gz"}), "label": index % 3})
    return DataLoader(items, batch_size=2, shuffle=False)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("decollate", [True, False])
def test_finite_guard_names_epoch_iteration_and_files_of_a_nan_batch(spatial_dims, decollate):
    """A real SupervisedTrainer on a batch holding a NaN: the loss is NaN and, without a guard, training goes on
    (the weights become NaN); FiniteGuard raises in that iteration, before the optimizer step, naming it and the
    files, and the weights stay finite."""
    from monai_kdx.handlers import FiniteGuard

    network = _net(spatial_dims)
    trainer = _trainer(network, _files_loader(spatial_dims, nan_case=2), lr=0.1, max_epochs=2)
    trainer.run()  # without the guard: no error, a NaN loss and NaN weights
    assert not all(torch.isfinite(p).all() for p in network.parameters())

    network = _net(spatial_dims)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=2,
        train_data_loader=_files_loader(spatial_dims, nan_case=2),
        network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.1),
        loss_function=torch.nn.CrossEntropyLoss(),
        train_handlers=[FiniteGuard()],
        decollate=decollate,
    )
    expected = (
        r"non-finite training output at epoch 1, iteration 2 \(overall iteration 2\): loss=nan\. "
        r"Images with NaN or infinite values: \['case_2\.nii\.gz'\]\. "
        r"Files of the batch: \['case_2\.nii\.gz', 'case_3\.nii\.gz'\]\."
    )
    with pytest.raises(FloatingPointError, match=expected):
        trainer.run()
    assert trainer.state.iteration == 2  # the first, finite batch passed
    assert all(torch.isfinite(p).all() for p in network.parameters())  # stopped before the optimizer step


def test_finite_guard_checks_every_scalar_output_and_plain_engines():
    """Any scalar entry (a distillation or saliency part, not only the loss) is checked; a batch without MONAI
    metadata is said to carry no file names; a plain ignite engine returning a float works too."""
    from ignite.engine import Engine
    from monai.bundle import ConfigParser

    from monai_kdx.handlers import FiniteGuard

    outputs = iter([{"loss": torch.tensor(1.0), "kd": torch.tensor(0.5)}, {"loss": 1.0, "kd": float("inf")}])
    engine = Engine(lambda engine, batch: next(outputs))
    guard = ConfigParser({"guard": {"_target_": "monai_kdx.handlers.FiniteGuard"}}).get_parsed_content("guard")
    guard.attach(engine)
    message = r"epoch 1, iteration 2 \(overall iteration 2\): kd=inf\. The batch carries no file names"
    with pytest.raises(FloatingPointError, match=message):
        engine.run([{"image": torch.zeros(1)}] * 3)
    engine = Engine(lambda engine, batch: float("nan") if engine.state.iteration == 5 else 0.1)
    FiniteGuard().attach(engine)
    with pytest.raises(FloatingPointError, match=r"epoch 2, iteration 2 \(overall iteration 5\): output=nan"):
        engine.run([0, 1, 2], max_epochs=3)
    with pytest.raises(ValueError, match="image_key must be a non-empty string"):
        FiniteGuard(image_key="")
