"""Saliency metrics (KL, CC, SIM, NSS, AUC-Judd): hand-computed tiny maps, an independent numpy reference on
random 2D and 3D batches, defined values for degenerate maps, every input error, and the MONAI metric
classes inside an ignite engine."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor
from monai.handlers import IgniteMetricHandler

from monai_kdx.metrics import (
    SALIENCY_EPS,
    SaliencyAUCJuddMetric,
    SaliencyCCMetric,
    SaliencyKLMetric,
    SaliencyNSSMetric,
    SaliencySIMMetric,
    saliency_auc_judd,
    saliency_cc,
    saliency_kl,
    saliency_nss,
    saliency_sim,
)

DENSITY_METRICS = [saliency_kl, saliency_cc, saliency_sim]  # (saliency, target_map)
FIXATION_METRICS = [saliency_nss, saliency_auc_judd]  # (saliency, fixation_map)
ALL_METRICS = DENSITY_METRICS + FIXATION_METRICS


def as_map(values) -> torch.Tensor:
    """A nested list of one 2D/3D map -> (1, 1, *spatial) float64."""
    return torch.tensor(values, dtype=torch.float64)[None, None]


# ---------------------------------------------------------------- numpy reference (loops, float64, one sample)


def np_kl(s: np.ndarray, g: np.ndarray, eps: float = SALIENCY_EPS) -> float:
    s, g = s.ravel() / s.sum(), g.ravel() / g.sum()
    return float(sum(gi * math.log(eps + gi / (si + eps)) for si, gi in zip(s, g, strict=True)))


def np_cc(s: np.ndarray, g: np.ndarray) -> float:
    return float(np.corrcoef(s.ravel(), g.ravel())[0, 1])


def np_sim(s: np.ndarray, g: np.ndarray) -> float:
    return float(np.minimum(s.ravel() / s.sum(), g.ravel() / g.sum()).sum())


def np_nss(s: np.ndarray, f: np.ndarray) -> float:
    z = (s - s.mean()) / s.std()
    return float(z[f > 0].mean())


def np_auc_judd(s: np.ndarray, f: np.ndarray) -> float:
    """The MIT saliency benchmark loop, counting values >= threshold (no jitter)."""
    s, f = s.ravel(), f.ravel() > 0
    n_fix, n_other = f.sum(), (~f).sum()
    tp, fp = [0.0], [0.0]
    for threshold in sorted(s[f], reverse=True):
        tp.append(np.sum(s[f] >= threshold) / n_fix)
        fp.append(np.sum(s[~f] >= threshold) / n_other)
    tp.append(1.0)
    fp.append(1.0)
    return float(np.trapezoid(tp, fp))


REFERENCES = {saliency_kl: np_kl, saliency_cc: np_cc, saliency_sim: np_sim, saliency_nss: np_nss}
REFERENCES[saliency_auc_judd] = np_auc_judd


# ---------------------------------------------------------------- hand computations


def test_kl_by_hand():
    # S uniform: 1/4 each; G = [[1, 0], [0, 1]] -> [0.5, 0, 0, 0.5]
    # KL = 2 * 0.5 * log(eps + 0.5 / (0.25 + eps)) + 2 * 0 * log(eps + 0) ~= log 2
    value = saliency_kl(as_map([[1.0, 1.0], [1.0, 1.0]]), as_map([[1.0, 0.0], [0.0, 1.0]]))
    expected = math.log(SALIENCY_EPS + 0.5 / (0.25 + SALIENCY_EPS))
    assert value.shape == (1,)
    assert value.item() == pytest.approx(expected, abs=1e-12)
    assert value.item() == pytest.approx(math.log(2), abs=1e-5)
    # identical maps: log(eps + 1 / (1 + eps/p)) ~ 0; a custom eps is used as given
    assert saliency_kl(as_map([[1.0, 3.0]]), as_map([[2.0, 6.0]])).item() == pytest.approx(0.0, abs=1e-6)
    eps = 0.1  # S = [0.5, 0.5], G = [1, 0]: 1 * log(0.1 + 1 / 0.6)
    assert saliency_kl(as_map([[1.0, 1.0]]), as_map([[1.0, 0.0]]), eps=eps).item() == pytest.approx(
        math.log(0.1 + 1 / 0.6)
    )


def test_cc_by_hand():
    # S = [1, 2, 3, 4] -> centered [-1.5, -0.5, 0.5, 1.5], sum of squares 5
    # G = [0, 0, 1, 1] -> centered [-0.5, -0.5, 0.5, 0.5], sum of squares 1
    # covariance sum 0.75 + 0.25 + 0.25 + 0.75 = 2  ->  CC = 2 / sqrt(5 * 1)
    value = saliency_cc(as_map([[1.0, 2.0], [3.0, 4.0]]), as_map([[0.0, 0.0], [1.0, 1.0]]))
    assert value.item() == pytest.approx(2 / math.sqrt(5))
    # negative saliency is allowed for CC; an anti-correlated map gives -1
    assert saliency_cc(as_map([[-1.0, -2.0]]), as_map([[1.0, 2.0]])).item() == pytest.approx(-1.0)


def test_sim_by_hand():
    # S / 10 = [0.1, 0.2, 0.3, 0.4]; G / 2 = [0, 0, 0.5, 0.5]; sum of minima = 0 + 0 + 0.3 + 0.4
    value = saliency_sim(as_map([[1.0, 2.0], [3.0, 4.0]]), as_map([[0.0, 0.0], [1.0, 1.0]]))
    assert value.item() == pytest.approx(0.7)


def test_nss_by_hand():
    # S = [1, 2, 3, 4]: mean 2.5, population std sqrt(5/4); z = [-1.5, -0.5, 0.5, 1.5] / sqrt(1.25)
    saliency = as_map([[1.0, 2.0], [3.0, 4.0]])
    assert saliency_nss(saliency, as_map([[0.0, 0.0], [0.0, 1.0]])).item() == pytest.approx(1.5 / math.sqrt(1.25))
    # fixations at 3 and 4: mean z = (0.5 + 1.5) / 2 / sqrt(1.25)
    assert saliency_nss(saliency, as_map([[0.0, 0.0], [1.0, 1.0]])).item() == pytest.approx(1 / math.sqrt(1.25))
    assert saliency_nss(-saliency, as_map([[0.0, 0.0], [1.0, 1.0]])).item() == pytest.approx(-1 / math.sqrt(1.25))


def test_auc_judd_by_hand():
    # S = 1..9 row-major, fixations at the values 9 and 5 (2 fixations, 7 other pixels).
    # threshold 9: TP 1/2, FP 0/7; threshold 5: TP 2/2, FP 3/7 (6, 7, 8 are >= 5 and not fixated)
    # curve (0,0) (0,1/2) (3/7,1) (1,1): area 0 + 3/7 * (1/2 + 1)/2 + 4/7 * 1 = 9/28 + 16/28 = 25/28
    saliency = as_map([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    fixations = as_map([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert saliency_auc_judd(saliency, fixations).item() == pytest.approx(25 / 28)
    # (the full ROC AUC would be 22/28: the Judd curve interpolates between fixation thresholds)


def test_auc_judd_counts_ties():
    # S = [1, 1, 1, 0], fixation at the first 1: threshold 1 gives TP 1, FP 2/3 (two other 1s)
    # curve (0,0) (2/3,1) (1,1): area 2/3 * 1/2 + 1/3 * 1 = 2/3
    value = saliency_auc_judd(as_map([[1.0, 1.0], [1.0, 0.0]]), as_map([[1.0, 0.0], [0.0, 0.0]]))
    assert value.item() == pytest.approx(2 / 3)


# ---------------------------------------------------------------- numpy reference, 2D and 3D, batched


def random_inputs(spatial: tuple[int, ...], batch: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    saliency = torch.rand(batch, 1, *spatial, generator=generator, dtype=torch.float64)
    target = torch.rand(batch, 1, *spatial, generator=generator, dtype=torch.float64) ** 3
    fixations = (torch.rand(batch, 1, *spatial, generator=generator) > 0.8).double()
    fixations.view(batch, -1)[:, 0] = 1  # at least one fixation per sample
    return saliency, target, fixations


@pytest.mark.parametrize("spatial", [(6, 7), (4, 5, 3)], ids=["2d", "3d"])
@pytest.mark.parametrize("metric", ALL_METRICS, ids=lambda f: f.__name__)
def test_matches_numpy_reference_per_sample(metric, spatial):
    saliency, target, fixations = random_inputs(spatial)
    reference_map = fixations if metric in FIXATION_METRICS else target
    values = metric(saliency, reference_map)
    assert values.shape == (3,) and values.dtype == torch.float64
    expected = [REFERENCES[metric](s.numpy(), r.numpy()) for s, r in zip(saliency, reference_map, strict=True)]
    np.testing.assert_allclose(values.numpy(), expected, rtol=1e-9, atol=1e-12)
    assert len(set(values.tolist())) == 3  # the samples differ, so mixing would show
    # each sample alone gives the same value as inside the batch
    single = torch.cat([metric(saliency[i : i + 1], reference_map[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(values, single)


def test_auc_judd_with_ties_matches_reference():
    generator = torch.Generator().manual_seed(1)
    saliency = torch.randint(0, 4, (4, 1, 5, 5), generator=generator).double()  # many ties
    fixations = (torch.rand(4, 1, 5, 5, generator=generator) > 0.6).double()
    expected = [np_auc_judd(s.numpy(), f.numpy()) for s, f in zip(saliency, fixations, strict=True)]
    np.testing.assert_allclose(saliency_auc_judd(saliency, fixations).numpy(), expected, rtol=1e-12)


def test_float32_bool_and_metatensor_inputs():
    saliency, target, fixations = random_inputs((5, 5), seed=2)
    for metric in ALL_METRICS:
        reference_map = fixations if metric in FIXATION_METRICS else target
        expected = metric(saliency, reference_map)
        reference_map = reference_map.bool() if metric in FIXATION_METRICS else reference_map.float()
        value = metric(MetaTensor(saliency.float()), reference_map)
        assert type(value) is torch.Tensor and value.dtype == torch.float32
        torch.testing.assert_close(value, expected.float(), rtol=1e-4, atol=1e-5)
    # mixed precision promotes: float32 saliency with a float64 target gives float64
    assert saliency_cc(saliency.float(), target).dtype == torch.float64


# ---------------------------------------------------------------- degenerate maps


@pytest.mark.parametrize("constant", [0.0, 0.1, 3.0])
def test_constant_saliency_is_defined(constant):
    _, target, fixations = random_inputs((4, 4), batch=2, seed=3)
    target, fixations = target.float(), fixations.float()
    saliency = torch.full_like(target, constant)
    assert torch.equal(saliency_cc(saliency, target), torch.zeros(2))
    assert torch.equal(saliency_nss(saliency, fixations), torch.zeros(2))
    assert torch.equal(saliency_auc_judd(saliency, fixations), torch.full((2,), 0.5))
    uniform = torch.ones_like(target)  # a constant map, including all zeros, is the uniform distribution
    torch.testing.assert_close(saliency_kl(saliency, target), saliency_kl(uniform, target))
    torch.testing.assert_close(saliency_sim(saliency, target), saliency_sim(uniform, target))
    assert torch.isfinite(saliency_kl(saliency, target)).all()


def test_empty_target_and_fixation_maps_give_defined_values():
    saliency = torch.rand(2, 1, 3, 4, 2)
    empty = torch.zeros_like(saliency)
    assert torch.equal(saliency_kl(saliency, empty), torch.zeros(2))
    assert torch.equal(saliency_cc(saliency, empty), torch.zeros(2))
    assert torch.equal(saliency_sim(saliency, empty), torch.zeros(2))
    assert torch.equal(saliency_nss(saliency, empty), torch.zeros(2))
    assert torch.equal(saliency_auc_judd(saliency, empty), torch.full((2,), 0.5))


def test_every_position_fixated():
    saliency = torch.rand(1, 1, 3, 3)
    full = torch.ones_like(saliency)
    assert saliency_auc_judd(saliency, full).item() == 0.5
    assert saliency_nss(saliency, full).item() == pytest.approx(0.0, abs=1e-6)


def test_degenerate_sample_does_not_affect_the_others():
    saliency, target, _ = random_inputs((4, 4), batch=2, seed=4)
    target[1] = 0
    values = saliency_cc(saliency, target)
    assert values[1] == 0 and values[0] == pytest.approx(np_cc(saliency[0].numpy(), target[0].numpy()))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("metric", ALL_METRICS, ids=lambda f: f.__name__)
def test_shape_and_ndim_errors(metric):
    good = torch.rand(2, 1, 4, 4)
    with pytest.raises(ValueError, match="shape mismatch"):
        metric(good, torch.ones(2, 1, 4, 5))
    with pytest.raises(ValueError, match="shape mismatch"):
        metric(good, torch.ones(1, 1, 4, 4))  # no broadcasting over the batch
    for bad in (torch.rand(2, 4, 4), torch.rand(2, 1, 2, 2, 2, 2), torch.rand(2, 3, 4, 4)):
        with pytest.raises(ValueError, match=r"saliency must have shape \(B, 1, H, W\)"):
            metric(bad, torch.ones_like(bad))
    with pytest.raises(ValueError, match="must have shape"):
        metric(good, torch.ones(2, 4, 4))
    with pytest.raises(ValueError, match="empty"):
        metric(torch.rand(0, 1, 4, 4), torch.ones(0, 1, 4, 4))
    with pytest.raises(TypeError, match="saliency must be a torch.Tensor"):
        metric(good.numpy(), torch.ones_like(good))


@pytest.mark.parametrize("metric", ALL_METRICS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_values_name_the_sample(metric, bad_value):
    saliency, reference = torch.rand(3, 1, 4, 4), torch.ones(3, 1, 4, 4)
    bad = saliency.clone()
    bad[2, 0, 1, 1] = bad_value
    with pytest.raises(ValueError, match=r"saliency contains NaN or infinite values \(samples \[2\]\)"):
        metric(bad, reference)
    bad_reference = reference.clone()
    bad_reference[0, 0, 0, 0] = bad_value
    with pytest.raises(ValueError, match=r"contains NaN or infinite values \(samples \[0\]\)"):
        metric(saliency, bad_reference)


def test_negative_values():
    saliency, target = torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 4)
    negative = saliency - 0.5
    for metric in (saliency_kl, saliency_sim):
        with pytest.raises(ValueError, match="saliency must be non-negative"):
            metric(negative, target)
        with pytest.raises(ValueError, match="target_map must be non-negative"):
            metric(saliency, target - 0.5)
    with pytest.raises(ValueError, match="target_map must be non-negative"):
        saliency_cc(saliency, target - 0.5)
    fixations = (target > 0.5).float()
    for metric in (saliency_cc, saliency_nss, saliency_auc_judd):  # any real saliency is fine
        assert torch.isfinite(metric(negative, fixations)).all()


@pytest.mark.parametrize("metric", FIXATION_METRICS, ids=lambda f: f.__name__)
def test_non_binary_fixation_map(metric):
    fixations = torch.zeros(2, 1, 4, 4)
    fixations[1, 0, 0, 0] = 0.5
    with pytest.raises(ValueError, match=r"fixation_map must be binary \(0/1\).*samples \[1\]"):
        metric(torch.rand(2, 1, 4, 4), fixations)


# ---------------------------------------------------------------- MONAI metric classes


METRIC_CLASSES = [
    (SaliencyKLMetric, saliency_kl),
    (SaliencyCCMetric, saliency_cc),
    (SaliencySIMMetric, saliency_sim),
    (SaliencyNSSMetric, saliency_nss),
    (SaliencyAUCJuddMetric, saliency_auc_judd),
]


@pytest.mark.parametrize(("metric_class", "function"), METRIC_CLASSES, ids=lambda x: x.__name__)
def test_metric_class_in_ignite_engine_gives_mean_over_iterations(metric_class, function):
    uses_fixations = function in FIXATION_METRICS
    batches = []
    for seed in (10, 11):  # two iterations of batches of 2 and 3
        saliency, target, fixations = random_inputs((5, 6), batch=2 + seed % 2, seed=seed)
        batches.append((saliency.float(), (fixations if uses_fixations else target).float()))
    engine = Engine(lambda engine, batch: batch)
    IgniteMetricHandler(metric_fn=metric_class()).attach(engine, "score")
    engine.run(batches, max_epochs=1)
    per_sample = torch.cat([function(s, r) for s, r in batches])
    assert engine.state.metrics["score"] == pytest.approx(per_sample.mean().item(), rel=1e-5)
    torch.testing.assert_close(engine.state.metric_details["score"], per_sample.unsqueeze(1))


def test_metric_class_accepts_decollated_lists_and_reductions():
    saliency, target, _ = random_inputs((4, 4, 3), batch=3, seed=5)
    metric = SaliencyKLMetric(reduction="none", get_not_nans=True)
    metric(list(saliency), list(target))  # channel-first items, as after decollate_batch
    values, not_nans = metric.aggregate()
    torch.testing.assert_close(values, saliency_kl(saliency, target).unsqueeze(1))
    assert metric.aggregate(reduction="sum")[0].item() == pytest.approx(values.sum().item())
    assert not_nans.shape == (3, 1)
    with pytest.raises(ValueError, match="needs y"):
        SaliencyCCMetric()(saliency)


# ---------------------------------------------------------------- issue 14: half precision, empty references, eps


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("metric", ALL_METRICS, ids=lambda f: f.__name__)
def test_half_precision_maps_are_computed_in_float32(metric, dtype):
    """A 32³ volume's sums overflow float16 (max 65504: KL, SIM and CC gave 0) and bfloat16 keeps three digits
    (NSS was off by 10x): every metric of half-precision maps now equals the float64 reference on the same
    (rounded) values, and returns float32."""
    generator = torch.Generator().manual_seed(7)
    shape = (2, 1, 32, 32, 32)
    saliency = (torch.rand(shape, generator=generator) * 8).to(dtype)
    target = (torch.rand(shape, generator=generator) * 8).to(dtype)
    fixations = (torch.rand(shape, generator=generator) > 0.99).to(dtype)
    reference_map = fixations if metric in FIXATION_METRICS else target
    values = metric(saliency, reference_map)
    assert values.dtype == torch.float32
    expected = [
        REFERENCES[metric](s.double().numpy(), r.double().numpy()) for s, r in zip(saliency, reference_map, strict=True)
    ]
    np.testing.assert_allclose(values.numpy(), expected, rtol=1e-4, atol=1e-6)


def test_float16_identical_maps_by_hand():
    """A 64x64 float16 map compared with itself: CC = 1 and SIM = 1 (CC gave 0: the product of the two sums of
    squares, about 1.2e5, overflows float16)."""
    saliency = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(8)).half()
    assert saliency_cc(saliency, saliency).item() == pytest.approx(1.0, abs=1e-6)
    assert saliency_sim(saliency, saliency).item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(("metric_class", "function"), METRIC_CLASSES, ids=lambda x: x.__name__)
def test_metric_classes_skip_samples_with_an_all_zero_reference(metric_class, function):
    """An all-zero target (or fixation) map has nothing to compare with: the cumulative metric gives NaN for that
    sample, so MONAI's mean is over the other samples and ``not_nans`` counts them (it averaged in 0, or 0.5 for
    AUC-Judd, before)."""
    saliency, target, fixations = random_inputs((5, 6), batch=3, seed=12)
    reference_map = (fixations if function in FIXATION_METRICS else target).clone()
    reference_map[1] = 0
    metric = metric_class(get_not_nans=True)
    metric(saliency, reference_map)
    value, not_nans = metric.aggregate()
    valid = function(saliency, reference_map)[[0, 2]]  # the functional form still gives 0 (0.5) for sample 1
    assert value.item() == pytest.approx(valid.mean().item(), rel=1e-6)
    assert not_nans.item() == 2
    per_sample = metric.get_buffer().flatten()
    assert torch.isnan(per_sample[1]) and torch.isfinite(per_sample[[0, 2]]).all()
    # a batch of one empty map: nothing to average, MONAI reports 0 over 0 non-NaN values
    metric = metric_class(get_not_nans=True)
    metric(saliency[1:2], reference_map[1:2])
    assert metric.aggregate()[1].item() == 0


@pytest.mark.parametrize("eps", [0.0, -1e-7, float("nan"), float("inf"), "1e-7"])
def test_kl_refuses_an_eps_that_is_not_positive(eps):
    """eps = 0 takes log(0) where the saliency is 0; a negative eps gives NaN: refused, naming the argument."""
    saliency, target = torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4)
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        saliency_kl(saliency, target, eps=eps)
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        SaliencyKLMetric(eps=eps)
