"""Explanation metrics: localization (pointing game, relevance mass, rank accuracy), faithfulness (deletion and
insertion AUC on a hand-built network), agreement between maps, and the parameter-randomization sanity
check; hand-computed values, 2D and 3D, batches, every error, and the MONAI metric classes in an engine."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.handlers import IgniteMetricHandler
from scipy.stats import spearmanr
from torch import nn

from monai_kdx.metrics import (
    PointingGameMetric,
    RandomizationResult,
    RelevanceMassMetric,
    RelevanceRankAccuracyMetric,
    deletion_auc,
    explanation_agreement,
    insertion_auc,
    perturbation_curve,
    pointing_game,
    randomizable_layers,
    randomization_sanity_check,
    relevance_mass,
    relevance_rank_accuracy,
)

LOCALIZATION = [pointing_game, relevance_mass, relevance_rank_accuracy]


def grid(values) -> torch.Tensor:
    """A nested list of one 2D/3D map -> (1, 1, *spatial) float tensor."""
    return torch.tensor(values, dtype=torch.float32)[None, None]


def mask_at(shape: tuple[int, ...], *positions: tuple[int, ...]) -> torch.Tensor:
    """(1, 1, *shape) binary mask with ones at the given positions."""
    mask = torch.zeros(1, 1, *shape)
    for position in positions:
        mask[(0, 0, *position)] = 1
    return mask


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ---------------------------------------------------------------- pointing game


def test_pointing_game_by_hand_with_tolerance():
    attribution = torch.zeros(4, 4)
    attribution[1, 2], attribution[3, 0] = 5.0, 2.0  # maximum at (1, 2)
    attribution = attribution.expand(4, 1, 4, 4)
    masks = torch.cat(
        [
            mask_at((4, 4), (1, 2)),  # contains the maximum
            mask_at((4, 4), (0, 0), (3, 0)),  # Chebyshev distance 2 from it (both)
            mask_at((4, 4), (2, 3)),  # distance 1
            mask_at((4, 4), (3, 3)),  # distance max(2, 1) = 2
        ]
    )
    assert pointing_game(attribution, masks).tolist() == [1.0, 0.0, 0.0, 0.0]
    assert pointing_game(attribution, masks, tolerance=1).tolist() == [1.0, 0.0, 1.0, 0.0]
    assert pointing_game(attribution, masks, tolerance=2).tolist() == [1.0, 1.0, 1.0, 1.0]


def test_pointing_game_ties_take_the_first_argmax():
    attribution = torch.zeros(1, 1, 3, 3)
    attribution[0, 0, 0, 1] = attribution[0, 0, 2, 2] = 7.0  # (0, 1) comes first in row-major order
    assert pointing_game(attribution, mask_at((3, 3), (0, 1))).item() == 1.0
    assert pointing_game(attribution, mask_at((3, 3), (2, 2))).item() == 0.0


def test_pointing_game_3d():
    attribution = torch.rand(2, 1, 3, 4, 5) * 0.5
    attribution[:, 0, 2, 0, 3] = 1.0
    masks = torch.cat([mask_at((3, 4, 5), (2, 0, 3)), mask_at((3, 4, 5), (1, 1, 4))])  # hit; distance 1
    assert pointing_game(attribution, masks).tolist() == [1.0, 0.0]
    assert pointing_game(attribution, masks, tolerance=1).tolist() == [1.0, 1.0]


# ---------------------------------------------------------------- relevance mass and rank accuracy


def test_relevance_mass_by_hand_ignores_negative_relevance():
    attribution = grid([[2.0, -1.0], [1.0, -3.0]]).expand(2, 1, 2, 2)
    masks = torch.cat([grid([[1, 1], [0, 0]]), grid([[0, 1], [0, 1]])])
    # positive part [2, 0, 1, 0], total 3: first mask holds 2 -> 2/3, second holds 0
    torch.testing.assert_close(relevance_mass(attribution, masks), torch.tensor([2 / 3, 0.0]))
    # no positive relevance at all -> 0
    assert relevance_mass(torch.zeros(1, 1, 2, 2), grid([[1, 0], [0, 0]])).item() == 0.0
    assert relevance_mass(-torch.ones(1, 1, 2, 2), grid([[1, 0], [0, 0]])).item() == 0.0


def test_relevance_mass_3d():
    attribution = torch.arange(1.0, 9.0).view(1, 1, 2, 2, 2)  # total 36
    mask = mask_at((2, 2, 2), (0, 0, 0), (1, 1, 1))  # holds 1 + 8
    assert relevance_mass(attribution, mask).item() == pytest.approx(9 / 36)


def test_relevance_rank_accuracy_by_hand():
    attribution = torch.arange(16.0).view(1, 1, 4, 4)  # top-3 positions: flat 15, 14, 13
    mask = mask_at((4, 4), (3, 3), (3, 1), (0, 0))  # flat 15, 13, 0 -> K = 3, hits 15 and 13
    assert relevance_rank_accuracy(attribution, mask).item() == pytest.approx(2 / 3)
    # ties rank by flat index: the top-3 of [5, 5, 5, 5, 1, 1, ...] are flat 0, 1, 2 -> mask {0, 1, 5} has 2 hits
    tied = torch.ones(1, 1, 4, 4)
    tied.view(-1)[:4] = 5.0
    assert relevance_rank_accuracy(tied, mask_at((4, 4), (0, 0), (0, 1), (1, 1))).item() == pytest.approx(2 / 3)
    # negative relevance ranks lowest: -arange has its top-3 at flat 0, 1, 2
    assert relevance_rank_accuracy(-attribution, mask_at((4, 4), (0, 0), (0, 1), (0, 2))).item() == 1.0


def test_relevance_rank_accuracy_per_sample_k_and_3d():
    attribution = torch.arange(27.0).view(1, 1, 3, 3, 3).repeat(2, 1, 1, 1, 1)
    masks = torch.cat(
        [
            mask_at((3, 3, 3), (2, 2, 2)),  # K = 1, the top voxel -> 1
            mask_at((3, 3, 3), (2, 2, 2), (0, 0, 0), (0, 0, 1), (2, 2, 1)),  # K = 4, top-4 = 26..23 -> 2 hits
        ]
    )
    torch.testing.assert_close(relevance_rank_accuracy(attribution, masks), torch.tensor([1.0, 0.5]))


@pytest.mark.parametrize("metric", LOCALIZATION, ids=lambda f: f.__name__)
def test_empty_masks_raise_or_give_nan(metric):
    attribution = torch.rand(3, 1, 4, 4)
    masks = torch.zeros(3, 1, 4, 4)
    masks[1, 0, 2, 2] = 1
    with pytest.raises(ValueError, match=r"mask is empty for samples \[0, 2\].*ignore_empty=True"):
        metric(attribution, masks)
    values = metric(attribution, masks, ignore_empty=True)
    assert torch.isnan(values[[0, 2]]).all() and not torch.isnan(values[1])


@pytest.mark.parametrize("metric", LOCALIZATION, ids=lambda f: f.__name__)
def test_localization_errors(metric):
    attribution, mask = torch.rand(2, 1, 4, 4), torch.ones(2, 1, 4, 4)
    with pytest.raises(ValueError, match="shape mismatch"):
        metric(attribution, torch.ones(2, 1, 4, 3))
    with pytest.raises(ValueError, match=r"attribution must have shape \(B, 1, H, W\)"):
        metric(torch.rand(2, 4, 4), torch.ones(2, 4, 4))
    with pytest.raises(ValueError, match=r"attribution must have shape"):
        metric(torch.rand(2, 1, 2, 2, 2, 2), torch.ones(2, 1, 2, 2, 2, 2))
    nan_map = attribution.clone()
    nan_map[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"attribution contains NaN or infinite values \(samples \[1\]\)"):
        metric(nan_map, mask)
    with pytest.raises(ValueError, match=r"mask must be binary"):
        metric(attribution, mask * 0.5)
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        metric(attribution, mask.tolist())
    assert torch.isfinite(metric(attribution, mask.bool())).all()  # bool masks are fine


def test_pointing_game_rejects_bad_tolerance():
    for tolerance in (-1, 1.5):
        with pytest.raises(ValueError, match="tolerance must be a non-negative integer"):
            pointing_game(torch.rand(1, 1, 3, 3), torch.ones(1, 1, 3, 3), tolerance=tolerance)


# ---------------------------------------------------------------- deletion and insertion


class LinearScore(nn.Module):
    """logits = [sum over channels and positions of weight * x, 0], so P(class 0) = sigmoid(weighted sum)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone())  # (*spatial)
        self.child = nn.Dropout(0.0)  # a submodule whose own mode must survive
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        score = self.child(x.sum(1) * self.weight).flatten(1).sum(1)
        return torch.stack([score, torch.zeros_like(score)], dim=1)


def test_deletion_and_insertion_by_hand():
    weight = torch.tensor([[2.0, 1.0], [0.0, 0.0]])
    network, image = LinearScore(weight), torch.ones(1, 1, 2, 2)
    perfect, reversed_ = weight[None, None], -weight[None, None]
    # steps = 4 = N: one pixel per step. Perfect order: (0,0) w=2, (0,1) w=1, then the zeros.
    # deletion scores 3, 1, 0, 0, 0; insertion scores 0, 2, 3, 3, 3
    deletion = [sigmoid(3), sigmoid(1), 0.5, 0.5, 0.5]
    insertion = [0.5, sigmoid(2), sigmoid(3), sigmoid(3), sigmoid(3)]
    curve = perturbation_curve(network, image, perfect, 0, mode="deletion", steps=4)
    torch.testing.assert_close(curve, torch.tensor([deletion]))
    torch.testing.assert_close(
        perturbation_curve(network, image, perfect, 0, "insertion", 4), torch.tensor([insertion])
    )
    trapezoid = lambda ys: 0.25 * (ys[0] / 2 + sum(ys[1:-1]) + ys[-1] / 2)  # noqa: E731
    assert deletion_auc(network, image, perfect, 0, steps=4).item() == pytest.approx(trapezoid(deletion))
    assert insertion_auc(network, image, perfect, 0, steps=4).item() == pytest.approx(trapezoid(insertion))
    # reversed order: the zeros (0 before 1 by index at -0 ties), then w=1, then w=2
    # deletion scores 3, 3, 3, 2, 0; insertion scores 0, 0, 0, 1, 3
    reversed_deletion = [sigmoid(3), sigmoid(3), sigmoid(3), sigmoid(2), 0.5]
    reversed_insertion = [0.5, 0.5, 0.5, sigmoid(1), sigmoid(3)]
    assert deletion_auc(network, image, reversed_, 0, steps=4).item() == pytest.approx(trapezoid(reversed_deletion))
    assert insertion_auc(network, image, reversed_, 0, steps=4).item() == pytest.approx(trapezoid(reversed_insertion))
    # class 1 has probability 1 - P(class 0), so its area is 1 - the area of class 0
    assert deletion_auc(network, image, perfect, 1, steps=4).item() == pytest.approx(1 - trapezoid(deletion))


def test_steps_fewer_than_pixels_use_floor_fractions():
    # N = 4, steps = 3: removed counts floor(k * 4 / 3) = 0, 1, 2, 4 -> deletion scores 3, 1, 0, 0
    weight = torch.tensor([[2.0, 1.0], [0.0, 0.0]])
    curve = perturbation_curve(LinearScore(weight), torch.ones(1, 1, 2, 2), weight[None, None], 0, steps=3)
    torch.testing.assert_close(curve, torch.tensor([[sigmoid(3), sigmoid(1), 0.5, 0.5]]))


def test_faithful_attribution_beats_reversed_in_3d_with_channels():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 3, 5, generator=generator)
    network = LinearScore(weight)
    image = torch.rand(3, 2, 4, 3, 5, generator=generator)  # B = 3, C = 2 channels
    attribution = image.sum(1, keepdim=True) * weight  # gradient x input: the exact contribution
    target = torch.tensor([0, 0, 1])
    perfect = attribution * torch.tensor([1.0, 1.0, -1.0]).view(3, 1, 1, 1, 1)  # class 1: relevance is -score
    for steps in (2, 7):  # (with steps = 1 the curve is only the two endpoints, the same for any order)
        assert (
            deletion_auc(network, image, perfect, target, steps) < deletion_auc(network, image, -perfect, target, steps)
        ).all()
        assert (
            insertion_auc(network, image, perfect, target, steps)
            > insertion_auc(network, image, -perfect, target, steps)
        ).all()
    curve = perturbation_curve(network, image, perfect, target, "deletion", steps=5, baseline=0.25)
    with torch.no_grad():
        start = torch.softmax(network(image), 1)[torch.arange(3), target]
        end = torch.softmax(network(torch.full_like(image, 0.25)), 1)[torch.arange(3), target]
    torch.testing.assert_close(curve[:, 0], start)
    torch.testing.assert_close(curve[:, -1], end)


def test_chunking_baselines_and_per_sample_targets_agree():
    generator = torch.Generator().manual_seed(1)
    network = LinearScore(torch.randn(5, 6, generator=generator))
    image = torch.rand(3, 1, 5, 6, generator=generator)
    attribution = torch.randn(3, 1, 5, 6, generator=generator)
    reference = perturbation_curve(network, image, attribution, [1, 0, 1], "insertion", steps=6)
    for batch_size in (1, 4, 21, 100):
        torch.testing.assert_close(
            perturbation_curve(network, image, attribution, [1, 0, 1], "insertion", 6, batch_size=batch_size), reference
        )
    singles = torch.cat(
        [
            perturbation_curve(network, image[i : i + 1], attribution[i : i + 1], t, "insertion", 6)
            for i, t in enumerate([1, 0, 1])
        ]
    )
    torch.testing.assert_close(singles, reference)
    # a constant float baseline equals the same baseline as a (broadcast) tensor, e.g. a blurred image
    as_float = deletion_auc(network, image, attribution, 0, steps=6, baseline=0.3)
    torch.testing.assert_close(deletion_auc(network, image, attribution, 0, 6, torch.full_like(image, 0.3)), as_float)
    torch.testing.assert_close(deletion_auc(network, image, attribution, 0, 6, torch.tensor([[[[0.3]]]])), as_float)


def test_network_mode_restored_and_no_gradients_kept():
    network = LinearScore(torch.randn(3, 3))
    network.train()
    network.child.eval()  # mixed modes must come back as they were
    image, attribution = torch.rand(2, 1, 3, 3), torch.rand(2, 1, 3, 3)
    values = deletion_auc(network, image, attribution, 0, steps=3, batch_size=3)
    assert network.modes and not any(network.modes)  # every forward ran in eval mode
    assert network.training and not network.child.training
    assert network.weight.grad is None and not values.requires_grad
    network.modes.clear()
    with pytest.raises(ValueError, match="out of range"):
        insertion_auc(network, image, attribution, 2)
    assert network.training and not network.child.training  # restored on errors too


def test_faithfulness_errors():
    network = LinearScore(torch.randn(3, 3))
    image, attribution = torch.rand(2, 1, 3, 3), torch.rand(2, 1, 3, 3)
    with pytest.raises(ValueError, match=r"target class indices \[0, 2\] out of range for a network with 2 outputs"):
        deletion_auc(network, image, attribution, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="target entry 0 is class -1, out of range"):
        deletion_auc(network, image, attribution, -1)
    with pytest.raises(ValueError, match="target entry 1 is 1.5, not a whole-number class index"):
        deletion_auc(network, image, attribution, torch.tensor([0.0, 1.5]))
    with pytest.raises(ValueError, match="target has 3 entries for a batch of 2"):
        deletion_auc(network, image, attribution, [0, 1, 1])
    with pytest.raises(ValueError, match=r"baseline must be a number, a tensor or one of \('blur', 'noise', 'road'\)"):
        deletion_auc(network, image, attribution, 0, baseline="gray")
    for steps in (0, -3, 2.5):
        with pytest.raises(ValueError, match="steps must be an integer >= 1"):
            deletion_auc(network, image, attribution, 0, steps=steps)
    with pytest.raises(ValueError, match="batch_size must be None or an integer >= 1"):
        insertion_auc(network, image, attribution, 0, batch_size=0)
    with pytest.raises(ValueError, match="mode must be one of"):
        perturbation_curve(network, image, attribution, 0, mode="blur")
    with pytest.raises(ValueError, match=r"shape mismatch: attribution \(2, 1, 3, 2\) must be \(2, 1, 3, 3\)"):
        deletion_auc(network, image, attribution[..., :2], 0)
    with pytest.raises(ValueError, match="shape mismatch"):
        deletion_auc(network, image, attribution[:1], 0)
    with pytest.raises(ValueError, match=r"attribution must have shape \(B, 1, H, W\)"):
        deletion_auc(network, image, attribution.expand(2, 2, 3, 3), 0)
    with pytest.raises(ValueError, match=r"image must have shape \(B, C, H, W\)"):
        deletion_auc(network, image[:, 0], attribution, 0)
    bad = image.clone()
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"image contains NaN or infinite values \(samples \[1\]\)"):
        deletion_auc(network, bad, attribution, 0)
    with pytest.raises(ValueError, match="attribution contains NaN"):
        deletion_auc(network, image, bad, 0)
    with pytest.raises(ValueError, match="does not broadcast to the image shape"):
        deletion_auc(network, image, attribution, 0, baseline=torch.zeros(2, 1, 3, 4))
    with pytest.raises(ValueError, match=r"logits of shape \(N, K\) with K >= 2"):
        deletion_auc(nn.Sequential(nn.Flatten(), nn.Linear(9, 1)), image, attribution, 0)


# ---------------------------------------------------------------- agreement between maps


def test_agreement_cc_and_iou_by_hand():
    a, b = grid([[1.0, 2.0], [3.0, 4.0]]), grid([[0.0, 0.0], [1.0, 1.0]])
    assert explanation_agreement(a, b, "cc").item() == pytest.approx(2 / math.sqrt(5))  # as in the CC test
    # N = 10, top_fraction 0.2 -> k = 2: top of a = {0, 1}, top of b = {1, 2} -> IoU 1/3
    a = grid([[10.0, 9.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    b = grid([[0.0, 10.0, 9.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    assert explanation_agreement(a, b, "iou_top", top_fraction=0.2).item() == pytest.approx(1 / 3)
    # top_fraction 0.25 -> k = ceil(2.5) = 3: {0, 1, 2} vs {1, 2, 0} (ties by index) -> 1
    assert explanation_agreement(a, b, "iou_top", top_fraction=0.25).item() == 1.0


def test_iou_top_k_is_not_inflated_by_float_rounding():
    # 0.1 * 30 = 3.0000000000000004 in floating point; k must be 3, not 4
    a = torch.arange(30.0).view(1, 1, 5, 6)
    b = torch.zeros(30)
    b[[29, 28, 27, 0]] = torch.tensor([100.0, 99.0, 98.0, 97.0])  # 4th largest differs from a's (26)
    assert explanation_agreement(a, b.view(1, 1, 5, 6), "iou_top", top_fraction=0.1).item() == 1.0


@pytest.mark.parametrize("spatial", [(6, 5), (3, 4, 3)], ids=["2d", "3d"])
def test_rank_agreement_matches_scipy_with_ties(spatial):
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (3, 1, *spatial), generator=generator).double()
    b = a + torch.randint(0, 4, (3, 1, *spatial), generator=generator)
    values = explanation_agreement(a, b, "rank")
    expected = [spearmanr(x.ravel().numpy(), y.ravel().numpy()).statistic for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(values.numpy(), expected, rtol=1e-10)
    assert len(set(values.tolist())) == 3
    # Spearman is invariant to monotone transforms, Pearson is not
    assert explanation_agreement(a, a.exp(), "rank").tolist() == pytest.approx([1.0] * 3)
    assert (explanation_agreement(a, a.exp(), "cc") < 0.999).all()


def test_agreement_constant_maps_and_errors():
    a = torch.rand(2, 1, 4, 4)
    assert explanation_agreement(a, torch.ones_like(a), "rank").tolist() == [0.0, 0.0]
    assert explanation_agreement(a, torch.ones_like(a), "cc").tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="method must be one of"):
        explanation_agreement(a, a, "ssim")
    for fraction in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"top_fraction must be in \(0, 1\]"):
            explanation_agreement(a, a, "iou_top", top_fraction=fraction)
    with pytest.raises(ValueError, match="shape mismatch: map_a"):
        explanation_agreement(a, a[:, :, :3])
    with pytest.raises(ValueError, match="map_b contains NaN"):
        explanation_agreement(a, torch.full_like(a, float("nan")))


# ---------------------------------------------------------------- randomization sanity check


def tiny_cnn() -> nn.Module:
    torch.manual_seed(123)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()


def input_gradient(network: nn.Module, image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Plain input gradient, channel-summed; uses backward() so it would leave .grad on the network."""
    x = image.clone().requires_grad_(True)
    network(x)[torch.arange(len(x)), target].sum().backward()
    return x.grad.sum(1, keepdim=True)


def test_gradient_passes_the_randomization_check_and_model_is_untouched():
    network = tiny_cnn()
    image = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 2])
    before = {name: value.clone() for name, value in network.state_dict().items()}
    rng_state = torch.get_rng_state()
    result = randomization_sanity_check(network, input_gradient, image, target)
    assert isinstance(result, RandomizationResult)
    assert result.layers == randomizable_layers(network) == ["7", "3", "1", "0"]  # output end first
    assert list(result.similarity) == result.layers
    assert all(v.shape == (2,) for v in result.similarity.values())
    assert result.original.shape == (2, 1, 8, 8)
    assert result.final_similarity < 0.5
    assert all(torch.equal(value, before[name]) for name, value in network.state_dict().items())
    assert all(p.grad is None for p in network.parameters())
    assert not network.training
    assert torch.equal(torch.get_rng_state(), rng_state)  # the global random state is untouched
    again = randomization_sanity_check(network, input_gradient, image, target)  # seeded: reproducible
    assert all(torch.equal(again.similarity[k], v) for k, v in result.similarity.items())


def test_model_independent_method_fails_the_check():
    network = tiny_cnn()
    image = torch.rand(2, 1, 8, 8)
    result = randomization_sanity_check(network, lambda net, x, t: x.mean(1, keepdim=True), image, 0)
    for layer in result.layers:
        torch.testing.assert_close(result.similarity[layer], torch.ones(2))
    assert result.final_similarity == pytest.approx(1.0)


def test_sanity_check_on_3d_with_explicit_layers():
    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv3d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4**3, 2))
    image = torch.rand(1, 2, 4, 4, 4)
    result = randomization_sanity_check(network, input_gradient, image, torch.tensor([1]), layers=["3"], seed=5)
    assert result.layers == ["3"] and result.similarity["3"].shape == (1,)
    assert result.final_similarity < 0.9


def test_sanity_check_errors():
    network, image = tiny_cnn(), torch.rand(1, 1, 8, 8)
    with pytest.raises(ValueError, match="has no submodule 'classifier'"):
        randomization_sanity_check(network, input_gradient, image, 0, layers=["classifier"])
    with pytest.raises(ValueError, match="no layers with parameters"):
        randomization_sanity_check(nn.Sequential(nn.Flatten()), input_gradient, image, 0)
    with pytest.raises(ValueError, match=r"explain_fn must return maps of shape \(1, 1, 8, 8\)"):
        randomization_sanity_check(network, lambda net, x, t: x[..., :4], image, 0)
    with pytest.raises(ValueError, match="explain_fn output must have shape"):
        randomization_sanity_check(network, lambda net, x, t: x[:, 0], image, 0)


# ---------------------------------------------------------------- MONAI metric classes


@pytest.mark.parametrize(
    ("metric_class", "function"),
    [
        (PointingGameMetric, pointing_game),
        (RelevanceMassMetric, relevance_mass),
        (RelevanceRankAccuracyMetric, relevance_rank_accuracy),
    ],
    ids=lambda x: x.__name__,
)
def test_localization_metric_classes_in_ignite_engine(metric_class, function):
    generator = torch.Generator().manual_seed(3)
    batches = []
    for batch in (2, 3):
        attribution = torch.randn(batch, 1, 5, 4, 3, generator=generator)
        masks = (torch.rand(batch, 1, 5, 4, 3, generator=generator) > 0.5).float()
        batches.append((attribution, masks))
    batches[1][1][2] = 0  # one empty mask: NaN, skipped by the mean
    engine = Engine(lambda engine, batch: batch)
    IgniteMetricHandler(metric_fn=metric_class(ignore_empty=True)).attach(engine, "score")
    engine.run(batches, max_epochs=1)
    per_sample = torch.cat([function(a, m, ignore_empty=True) for a, m in batches])
    assert torch.isnan(per_sample[-1]) and torch.isfinite(per_sample[:-1]).all()
    assert engine.state.metrics["score"] == pytest.approx(per_sample[:-1].mean().item())
    with pytest.raises(ValueError, match="mask is empty"):
        metric_class()(*batches[1])


def test_pointing_game_metric_passes_tolerance():
    attribution = torch.zeros(1, 1, 4, 4)
    attribution[0, 0, 1, 1] = 1
    metric = PointingGameMetric(tolerance=1)
    metric(attribution, mask_at((4, 4), (2, 2)))
    metric(attribution, mask_at((4, 4), (3, 3)))
    assert metric.aggregate().item() == pytest.approx(0.5)


# ---------------------------------------------------------------- issue 14: half precision and constant maps


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_localization_by_hand(dtype):
    """A constant 8.0 attribution over a 32³ volume: its positive relevance (262144) overflows float16, so the
    relevance mass was 0 or NaN; it is the mask's share of the voxels, 1/4. Results are float32."""
    attribution = torch.full((1, 1, 32, 32, 32), 8.0, dtype=dtype)
    mask = torch.zeros(1, 1, 32, 32, 32, dtype=dtype)
    mask[..., :8] = 1  # 8 of 32 slices
    value = relevance_mass(attribution, mask)
    assert value.dtype == torch.float32 and value.item() == 0.25
    # rank accuracy 2/3 (see test_relevance_rank_accuracy_by_hand): exact in float32, not rounded to 0.6665
    tied = torch.ones(1, 1, 4, 4)
    tied.view(-1)[:4] = 5.0
    value = relevance_rank_accuracy(tied.to(dtype), mask_at((4, 4), (0, 0), (0, 1), (1, 1)).to(dtype))
    assert value.dtype == torch.float32 and value.item() == pytest.approx(2 / 3, abs=1e-7)
    assert pointing_game(tied.to(dtype), mask_at((4, 4), (0, 0)).to(dtype)).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("method", ["cc", "rank", "iou_top"])
def test_half_precision_agreement_by_hand(method, dtype):
    """A 64x64 map agrees perfectly with itself by every method: 1.0 (float16 gave 0 for cc, whose sums of squares
    overflow, and NaN for rank, whose ranks reach 4095)."""
    a = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
    value = explanation_agreement(a, a.clone(), method)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(1.0, abs=1e-6)


def test_iou_top_of_constant_maps_is_zero():
    """Two all-zero maps have no top region to agree on: 0, as the correlations give for a constant map (it was
    1.0: both "top regions" were the first k positions by index)."""
    zeros, ramp = torch.zeros(2, 1, 4, 4), torch.arange(32.0).view(2, 1, 4, 4)
    for method in ("cc", "rank", "iou_top"):
        assert explanation_agreement(zeros, zeros, method).tolist() == [0.0, 0.0]
        assert explanation_agreement(torch.full_like(ramp, 3.0), ramp, method).tolist() == [0.0, 0.0]
    assert explanation_agreement(ramp, ramp, "iou_top").tolist() == [1.0, 1.0]


def test_constant_attribution_neither_points_nor_ranks():
    """An all-zero (or constant) attribution used to 'hit' whenever the mask covered the first positions in
    row-major order (pointing game 1, rank accuracy 2/3 here); it localizes nothing: 0."""
    masks = torch.cat([mask_at((4, 4), (0, 0), (0, 1), (1, 1)), mask_at((4, 4), (0, 0))])
    for constant in (0.0, 1.0):
        attribution = torch.full((2, 1, 4, 4), constant)
        assert pointing_game(attribution, masks).tolist() == [0.0, 0.0]
        assert pointing_game(attribution, masks, tolerance=1).tolist() == [0.0, 0.0]
        assert relevance_rank_accuracy(attribution, masks).tolist() == [0.0, 0.0]
    # the relevance mass of a positive constant is the mask's share of the positions (3/16, 1/16), 0 for zeros
    torch.testing.assert_close(relevance_mass(torch.ones(2, 1, 4, 4), masks), torch.tensor([3 / 16, 1 / 16]))
    assert relevance_mass(torch.zeros(2, 1, 4, 4), masks).tolist() == [0.0, 0.0]


def test_half_precision_logits_give_float32_curves_by_hand():
    """A network returning float16 logits (as under autocast): the curve is the float32 softmax, exact to 1e-7
    (float16 probabilities were rounded to 3 digits and the area summed in float16)."""
    weight = torch.tensor([[2.0, 1.0], [0.0, 0.0]])
    network = LinearScore(weight)
    half = nn.Sequential(network, HalfOutput())
    image, perfect = torch.ones(1, 1, 2, 2), weight[None, None]
    curve = perturbation_curve(half, image, perfect, 0, mode="deletion", steps=4)
    assert curve.dtype == torch.float32
    torch.testing.assert_close(curve, torch.tensor([[sigmoid(3), sigmoid(1), 0.5, 0.5, 0.5]]), rtol=0, atol=1e-7)
    trapezoid = 0.25 * (sigmoid(3) / 2 + sigmoid(1) + 0.5 + 0.5 + 0.5 / 2)
    assert deletion_auc(half, image, perfect, 0, steps=4).item() == pytest.approx(trapezoid, abs=1e-7)


class HalfOutput(nn.Module):
    """Casts the logits to float16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.half()


def test_sanity_check_with_float16_maps_matches_the_same_maps_in_float32():
    """Maps returned in float16 are ranked in float32: the Spearman similarities equal those of the same (rounded)
    maps given as float32 (ranks of 1024 pixels overflowed float16 and gave NaN)."""
    network = tiny_cnn()
    image = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 2])
    half = randomization_sanity_check(network, lambda n, x, t: input_gradient(n, x, t).half(), image, target)
    single = randomization_sanity_check(network, lambda n, x, t: input_gradient(n, x, t).half().float(), image, target)
    for layer in single.layers:
        assert torch.isfinite(half.similarity[layer]).all()
        torch.testing.assert_close(half.similarity[layer], single.similarity[layer], rtol=0, atol=1e-6)


@pytest.mark.parametrize("dims", [2, 3])
def test_road_imputes_removed_positions_from_the_kept_ones(dims):
    from monai_kdx.metrics.faithfulness import _road_imputation

    generator = torch.Generator().manual_seed(0)
    image = torch.full((1, 1, *[8] * dims), 3.0)
    image[(0, 0, *[slice(0, 1)] * dims)] = 3.0
    keep = torch.rand((1, 1, *[8] * dims), generator=generator) > 0.7
    imputed = _road_imputation(image, keep, generator)
    torch.testing.assert_close(imputed, image)  # a constant image: no position reveals what was removed
    ramp = torch.linspace(0, 1, 8).view(1, 1, 8, *[1] * (dims - 1)).expand(1, 1, *[8] * dims).contiguous()
    hole = torch.ones_like(keep)
    hole[(0, 0, slice(3, 5))] = False
    filled = _road_imputation(ramp, hole, generator)
    assert torch.equal(filled[hole], ramp[hole])
    assert (filled[~hole] - ramp[~hole]).abs().max() < 0.1  # the hole is filled from its neighbours


def test_named_baselines_are_deterministic_and_keep_the_image_statistics():
    network = LinearScore(torch.randn(12, 12) / 12)
    torch.manual_seed(0)
    image, attribution = torch.rand(2, 1, 12, 12) * 4 + 2, torch.rand(2, 1, 12, 12)
    for baseline in ("blur", "noise", "road"):
        first = deletion_auc(network, image, attribution, 0, baseline=baseline, seed=3)
        assert torch.equal(first, deletion_auc(network, image, attribution, 0, baseline=baseline, seed=3))
        assert first.shape == (2,) and torch.isfinite(first).all()
    from monai_kdx.metrics.faithfulness import _check_baseline

    noise = _check_baseline("noise", image, seed=0)
    assert abs(float(noise.mean() - image.mean())) < 0.3 and abs(float(noise.std() / image.std()) - 1) < 0.3
    blurred = _check_baseline("blur", image, seed=0)
    assert float(blurred.std()) < float(image.std()) and abs(float(blurred.mean() - image.mean())) < 0.1
