"""Distillation losses against hand computations, and the DistillationTrainer's real iteration."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from monai_kdx.engines import DistillationEvents, DistillationTrainer
from monai_kdx.explain import HierarchicalCAM
from monai_kdx.losses import (
    AttentionTransferLoss,
    DistillationLoss,
    ExplanationDistillationLoss,
    FeatureHintLoss,
    KnowledgeDistillationLoss,
)
from monai_kdx.networks import FeatureCapture
from monai_kdx.registry import DISTILLATION_LOSSES


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_kd_loss_equals_hand_computation():
    s = np.array([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3]])
    t = np.array([[3.0, 0.0, -2.0], [1.0, -1.0, 0.0]])
    y = np.array([0, 2])
    temperature, alpha = 5.0, 0.7
    ce = -np.mean(np.log(_softmax(s))[np.arange(2), y])
    pt, ps = _softmax(t / temperature), _softmax(s / temperature)
    kl = np.sum(pt * (np.log(pt) - np.log(ps))) / 2  # batchmean
    expected = (1 - alpha) * ce + alpha * temperature**2 * kl
    loss = KnowledgeDistillationLoss(temperature, alpha)
    value = loss(torch.tensor(s), torch.tensor(t), torch.tensor(y))
    assert value.item() == pytest.approx(expected, rel=1e-10)
    parts = loss.parts(torch.tensor(s), torch.tensor(t), torch.tensor(y))
    assert parts["kd"].item() == pytest.approx(alpha * temperature**2 * kl, rel=1e-10)


@pytest.mark.parametrize("temperature", [1.0, 4.0, 15.0])
def test_soft_term_gradient_is_t_times_probability_gap(temperature):
    """d/dz_s of T²·KL(q_t ‖ q_s) = T·(q_s − q_t)/B: the T² factor keeps the gradient scale."""
    torch.manual_seed(0)
    s = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 5, dtype=torch.float64)
    KnowledgeDistillationLoss(temperature, alpha=1.0)(s, t, torch.zeros(4, dtype=torch.long)).backward()
    expected = temperature * (torch.softmax(s / temperature, 1) - torch.softmax(t / temperature, 1)) / 4
    torch.testing.assert_close(s.grad, expected.detach())


def test_kd_errors_and_registry():
    with pytest.raises(ValueError, match="temperature"):
        KnowledgeDistillationLoss(temperature=0)
    with pytest.raises(ValueError, match="alpha"):
        KnowledgeDistillationLoss(alpha=1.5)
    with pytest.raises(ValueError, match="same classes"):
        KnowledgeDistillationLoss()(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2))
    assert DISTILLATION_LOSSES.get("kd") is KnowledgeDistillationLoss
    assert {"kd", "feature", "attention"} <= set(DISTILLATION_LOSSES.names())


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_feature_hint_adapter_and_interpolation(spatial_dims):
    torch.manual_seed(0)
    same = FeatureHintLoss("a", "b", 4, 4, spatial_dims)
    s, t = torch.randn(2, 4, *[6] * spatial_dims), torch.randn(2, 4, *[6] * spatial_dims)
    assert isinstance(same.adapter, nn.Identity)
    assert same(s, t).item() == pytest.approx(0.5 * ((s - t) ** 2).mean().item(), rel=1e-6)
    hint = FeatureHintLoss("a", "b", 3, 8, spatial_dims)
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    assert isinstance(hint.adapter, conv) and hint.adapter.weight.shape[:2] == (8, 3)
    student = torch.randn(2, 3, *[4] * spatial_dims, requires_grad=True)
    value = hint(student, torch.randn(2, 8, *[8] * spatial_dims))  # student map upsampled 4 -> 8
    value.backward()
    assert student.grad.abs().sum() > 0 and hint.adapter.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"expected \(B, 3"):
        hint(torch.randn(2, 5, *[4] * spatial_dims), torch.randn(2, 8, *[8] * spatial_dims))


def test_attention_transfer_equals_hand_computation():
    s = torch.tensor([[[[1.0, 2.0], [0.0, 1.0]], [[1.0, 0.0], [2.0, 1.0]]]])  # (1, 2, 2, 2)
    t = torch.tensor([[[[0.0, 3.0], [1.0, 0.0]]]])  # (1, 1, 2, 2)
    qs = np.array([2.0, 4.0, 4.0, 2.0])  # sum_c |A_c|^2
    qt = np.array([0.0, 9.0, 1.0, 0.0])
    expected = 0.5 * 10.0 * np.linalg.norm(qs / np.linalg.norm(qs) - qt / np.linalg.norm(qt))
    loss = AttentionTransferLoss(["s"], ["t"], p=2, beta=10.0)
    assert loss.from_outputs({"s": s}, {"t": t}, None).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="one to one"):
        AttentionTransferLoss(["a", "b"], ["c"])


def test_weighted_sum_of_named_terms():
    torch.manual_seed(0)
    student = {"logits": torch.randn(2, 3), "s1": torch.randn(2, 4, 5, 5)}
    teacher = {"logits": torch.randn(2, 3), "t1": torch.randn(2, 4, 5, 5)}
    y = torch.tensor([0, 1])
    kd = KnowledgeDistillationLoss(2.0, 0.5)
    attention = AttentionTransferLoss(["s1"], ["t1"])
    loss = DistillationLoss({"logits": kd, "attention": attention}, weights={"attention": 0.25})
    parts = loss(student, teacher, y)
    assert set(parts) == {"task", "kd", "attention", "total"}
    expected_attention = 0.25 * attention.from_outputs(student, teacher, y)
    assert parts["attention"].item() == pytest.approx(expected_attention.item())
    assert parts["total"].item() == pytest.approx((parts["task"] + parts["kd"] + parts["attention"]).item())
    assert loss.student_layers == ["s1"] and loss.teacher_layers == ["t1"]
    assert set(DistillationLoss({"logits": "kd"})(student, teacher, y)) == {"task", "kd", "total"}
    with pytest.raises(ValueError, match="unknown terms"):
        DistillationLoss({"logits": kd}, weights={"feature": 1.0})


def _net(spatial_dims: int, width: int, classes: int = 3) -> nn.Sequential:
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    pool = nn.AdaptiveAvgPool2d if spatial_dims == 2 else nn.AdaptiveAvgPool3d
    return nn.Sequential(
        conv(1, width, 3, padding=1),
        nn.ReLU(),
        conv(width, width, 3, padding=1),
        nn.ReLU(),
        pool(1),
        nn.Flatten(),
        nn.Linear(width, classes),
    )


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_trainer_runs_monai_iteration_with_frozen_teacher(spatial_dims):
    torch.manual_seed(0)
    teacher, student = _net(spatial_dims, 8), _net(spatial_dims, 4)
    teacher.train()  # the trainer must switch it to eval every iteration
    loss = DistillationLoss(
        {
            "logits": KnowledgeDistillationLoss(4.0, 0.5),
            "feature": FeatureHintLoss("2", "2", 4, 8, spatial_dims),
            "attention": AttentionTransferLoss(["0"], ["0"]),
        }
    )
    data = [{"image": torch.randn(2, 1, *[6] * spatial_dims), "label": torch.tensor([0, 2])} for _ in range(3)]
    optimizer = torch.optim.SGD(list(student.parameters()) + list(loss.parameters()), lr=0.1)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    adapter_before = loss.terms["feature"].adapter.weight.clone()
    trainer = DistillationTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=data,
        network=student,
        teacher_network=teacher,
        loss_function=loss,
        optimizer=optimizer,
        decollate=False,
    )
    seen = []
    trainer.add_event_handler(DistillationEvents.TEACHER_FORWARD_COMPLETED, lambda e: seen.append(teacher.training))
    trainer.run()
    output = trainer.state.output
    assert {"task", "kd", "feature", "attention", "loss"} <= set(output)
    total = output["task"] + output["kd"] + output["feature"] + output["attention"]
    assert output["loss"].item() == pytest.approx(total.item(), rel=1e-5)
    assert seen == [False, False, False]  # teacher forward each iteration, in eval mode
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())
    assert any(not torch.equal(student_before[k], v) for k, v in student.state_dict().items())
    assert not torch.equal(adapter_before, loss.terms["feature"].adapter.weight)
    assert sum(len(m._forward_hooks) for m in [*teacher.modules(), *student.modules()]) == 0


def test_trainer_rejects_bad_setups_before_training():
    kd = KnowledgeDistillationLoss()
    common = {"device": torch.device("cpu"), "max_epochs": 1, "train_data_loader": [], "optimizer": None}
    with pytest.raises(ValueError, match="number of classes: student 4, teacher 3"):
        DistillationTrainer(network=_net(2, 4, classes=4), teacher_network=_net(2, 8), loss_function=kd, **common)
    with pytest.raises(ValueError, match="spatial dimensionality: student 3, teacher 2"):
        DistillationTrainer(network=_net(3, 4), teacher_network=_net(2, 8), loss_function=kd, **common)
    with pytest.raises(ValueError, match="no submodule 'blocks.9'"):
        DistillationTrainer(
            network=_net(2, 4),
            teacher_network=_net(2, 8),
            loss_function=AttentionTransferLoss(["blocks.9"], ["0"]),
            **common,
        )
    with pytest.raises(ValueError, match="never wrapped in DDP"):
        DistillationTrainer(network=_net(2, 4), teacher_network=nn.DataParallel(_net(2, 8)), loss_function=kd, **common)
    with pytest.raises(ValueError, match="DistillationLoss or DistillationTerm"):
        DistillationTrainer(network=_net(2, 4), teacher_network=_net(2, 8), loss_function=nn.MSELoss(), **common)


def _outputs(network: nn.Module, x: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
    with FeatureCapture(network, layers) as features:
        logits = network(x)
        return {"logits": logits, **features}


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_explanation_term_compares_the_two_networks_cams_and_trains_the_student(spatial_dims):
    torch.manual_seed(0)
    teacher, student = _net(spatial_dims, 8).eval(), _net(spatial_dims, 4).eval()
    x, y = torch.randn(3, 1, *[6] * spatial_dims), torch.tensor([0, 2, 1])
    term = ExplanationDistillationLoss(["2"], ["2"], mode="gradcam")
    value = term.from_outputs(_outputs(student, x, ["2"]), _outputs(teacher, x, ["2"]), y)
    # the same maps from the public explainer (layer "2" keeps the input's resolution here)
    expected = F.mse_loss(
        HierarchicalCAM(student, ["2"]).cam(x, y)["2"], HierarchicalCAM(teacher, ["2"]).cam(x, y)["2"]
    )
    assert value.item() == pytest.approx(expected.item(), rel=1e-5) and value.item() > 0
    # gradients reach the student's first conv and, only through the CAM's weights, its head
    grads = torch.autograd.grad(value, [student[0].weight, student[-1].weight])
    assert all(g.abs().sum() > 0 for g in grads)
    # a student identical to the teacher explains identically: zero loss
    twin = _net(spatial_dims, 8).eval()
    twin.load_state_dict(teacher.state_dict())
    same = term.from_outputs(_outputs(twin, x, ["2"]), _outputs(teacher, x, ["2"]), y)
    assert same.item() == pytest.approx(0.0, abs=1e-12)
    # the teacher's prediction as target explains other classes than the labels
    by_teacher = ExplanationDistillationLoss(["2"], ["2"], target="teacher")
    assert by_teacher.from_outputs(_outputs(student, x, ["2"]), _outputs(teacher, x, ["2"]), y) != value


def test_explanation_term_in_the_trainer_leaves_the_frozen_teacher_untouched():
    torch.manual_seed(0)
    teacher, student = _net(2, 8), _net(2, 4)
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    loss = DistillationLoss(
        {"logits": KnowledgeDistillationLoss(4.0, 0.5), "explanation": ExplanationDistillationLoss(["2"], ["2"])},
        weights={"explanation": 10.0},
    )
    assert loss.needs_teacher_graph
    data = [{"image": torch.randn(2, 1, 8, 8), "label": torch.tensor([0, 2])} for _ in range(2)]
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    head_before = student[-1].weight.clone()
    trainer = DistillationTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=data,
        network=student,
        teacher_network=teacher,
        loss_function=loss,
        optimizer=torch.optim.SGD(student.parameters(), lr=0.1),
        decollate=False,
    )
    trainer.run()
    output = trainer.state.output
    assert output["explanation"] > 0
    assert output["loss"].item() == pytest.approx((output["task"] + output["kd"] + output["explanation"]).item())
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())
    assert not torch.equal(head_before, student[-1].weight)
    assert trainer._distill_inferer.teacher_graph_outputs is None  # the teacher's graph is freed


def test_explanation_term_errors():
    with pytest.raises(ValueError, match="one to one"):
        ExplanationDistillationLoss(["a"], ["b", "c"])
    with pytest.raises(ValueError, match="unknown CAM mode"):
        ExplanationDistillationLoss(["a"], ["b"], mode="cam")
    with pytest.raises(ValueError, match="distance"):
        ExplanationDistillationLoss(["a"], ["b"], distance="kl")
    with pytest.raises(ValueError, match="target"):
        ExplanationDistillationLoss(["a"], ["b"], target="pred")
    teacher, student = _net(2, 8), _net(2, 4)
    x = torch.randn(1, 1, 6, 6)
    with torch.no_grad():
        detached = _outputs(teacher, x, ["2"])
    with pytest.raises(ValueError, match="no autograd graph"):
        ExplanationDistillationLoss(["2"], ["2"]).from_outputs(_outputs(student, x, ["2"]), detached, torch.tensor([0]))
    assert DISTILLATION_LOSSES.get("explanation") is ExplanationDistillationLoss


# ---------------------------------------------------------------- issue 14: one-hot labels, invalid arguments


def test_one_hot_labels_are_refused_at_the_call():
    """One-hot (B, C) labels failed deep in cross_entropy ('Expected input batch_size (4) to match target
    batch_size (12)'): they are refused with the expected shape; (B,) and (B, 1) class indices give the same loss."""
    torch.manual_seed(0)
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    labels = torch.tensor([0, 1, 2, 1])
    one_hot = F.one_hot(labels, 3)
    kd = KnowledgeDistillationLoss(2.0, 0.5)
    expected = r"target of shape \(4, 3\) looks one-hot; expected class indices of shape \(B,\) or \(B, 1\)"
    for bad in (one_hot, one_hot.float()):
        with pytest.raises(ValueError, match=expected):
            kd(s, t, bad)
        with pytest.raises(ValueError, match=expected):
            DistillationLoss({"logits": kd})({"logits": s}, {"logits": t}, bad)
    assert kd(s, t, labels.view(4, 1)).item() == kd(s, t, labels).item()
    assert kd(s, t, labels.double()).item() == kd(s, t, labels).item()  # whole-number floats (NIfTI metadata)
    with pytest.raises(ValueError, match="target entry 1 is class 3, out of range"):
        kd(s, t, torch.tensor([0, 3, 1, 1]))
    with pytest.raises(ValueError, match="target has 3 entries for a batch of 4"):
        kd(s, t, labels[:3])
    # a term without labels still works without them
    attention = DistillationLoss({"attention": AttentionTransferLoss(["s"], ["t"])})
    maps = {"logits": s, "s": torch.rand(4, 2, 3, 3)}, {"logits": t, "t": torch.rand(4, 2, 3, 3)}
    assert torch.isfinite(attention(*maps, None)["total"])


def test_one_hot_labels_stop_the_distillation_trainer_before_any_step():
    torch.manual_seed(0)
    teacher, student = _net(2, 8), _net(2, 4)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    data = [{"image": torch.randn(2, 1, 6, 6), "label": F.one_hot(torch.tensor([0, 2]), 3)}]
    trainer = DistillationTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=data,
        network=student,
        teacher_network=teacher,
        loss_function=DistillationLoss({"logits": KnowledgeDistillationLoss()}),
        optimizer=torch.optim.SGD(student.parameters(), lr=1.0),
        decollate=False,
    )
    with pytest.raises(ValueError, match=r"looks one-hot; expected class indices of shape \(B,\) or \(B, 1\)"):
        trainer.run()
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


BAD_ARGUMENTS = [  # (factory, argument, bad values, the bound named in the message)
    pytest.param(
        lambda v: KnowledgeDistillationLoss(temperature=v), "temperature", [0, -1.0, float("inf"), "4"], "> 0"
    ),
    pytest.param(lambda v: KnowledgeDistillationLoss(alpha=v), "alpha", [float("nan"), -0.5, 1.5], ""),
    pytest.param(
        lambda v: AttentionTransferLoss(["a"], ["b"], beta=v), "beta", [-1.0, float("nan"), float("inf")], ">="
    ),
    pytest.param(lambda v: AttentionTransferLoss(["a"], ["b"], p=v), "p", [0.0, float("inf"), float("nan")], "> 0"),
    pytest.param(
        lambda v: DistillationLoss(
            {"logits": "kd", "attention": AttentionTransferLoss(["a"], ["b"])}, {"attention": v}
        ),
        r"weights\['attention'\]",
        [-0.5, float("nan"), float("inf"), "0.5"],
        ">= 0",
    ),
    pytest.param(lambda v: FeatureHintLoss("a", "b", v, 8, 2), "student_channels", [0, 2.5, True], "positive integer"),
    pytest.param(lambda v: FeatureHintLoss("a", v, 4, 8, 2), "teacher_layer", ["", None], "module paths"),
    pytest.param(lambda v: AttentionTransferLoss(v, ["b"]), "student_layers", ["blocks.2"], "list of module paths"),
    pytest.param(lambda v: ExplanationDistillationLoss(["a"], v), "teacher_layers", ["features", [""]], "module paths"),
]


@pytest.mark.parametrize(("factory", "argument", "values", "bound"), BAD_ARGUMENTS)
def test_invalid_term_arguments_are_refused_at_construction(factory, argument, values, bound):
    """A negative or NaN weight (DistillationLoss weights and beta were taken as given), an infinite temperature or
    exponent, a layer list written as one string (read as one path per character): refused, naming the argument."""
    for value in values:
        with pytest.raises(ValueError, match=rf"^{argument} must .*{bound}"):
            factory(value)
