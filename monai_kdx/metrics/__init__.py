"""Metrics for saliency and explanations, 2D and 3D, batched: every function takes maps of shape
(B, 1, H, W) or (B, 1, H, W, D) and returns one value per sample, (B,).

Two families:

* saliency metrics (:mod:`.saliency`): how close a model's saliency map is to a human reference such as
  radiologists' eye-gaze (KL, CC, SIM, NSS, AUC-Judd, as defined by Bylinskii et al.);
* explanation metrics: localization against a ground-truth mask (:mod:`.localization`: pointing game,
  relevance mass and rank accuracy), faithfulness to the model (:mod:`.faithfulness`: deletion and
  insertion AUC), and agreement between explanations (:mod:`.agreement`: teacher vs student maps, and the
  model-parameter-randomization sanity check).

The per-sample metrics also come as MONAI ``CumulativeIterationMetric`` classes (``y_pred`` = map,
``y`` = reference) for ``monai.handlers.IgniteMetricHandler`` and MONAI evaluators.
"""

from __future__ import annotations

from .agreement import (
    AGREEMENT_METHODS,
    RandomizationResult,
    explanation_agreement,
    randomizable_layers,
    randomization_sanity_check,
)
from .faithfulness import deletion_auc, insertion_auc, perturbation_curve
from .localization import (
    PointingGameMetric,
    RelevanceMassMetric,
    RelevanceRankAccuracyMetric,
    pointing_game,
    relevance_mass,
    relevance_rank_accuracy,
)
from .saliency import (
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
from .statistics import MeanMetric, bootstrap_interval

__all__ = [
    "SALIENCY_EPS",
    "saliency_kl",
    "saliency_cc",
    "saliency_sim",
    "saliency_nss",
    "saliency_auc_judd",
    "SaliencyKLMetric",
    "SaliencyCCMetric",
    "SaliencySIMMetric",
    "SaliencyNSSMetric",
    "SaliencyAUCJuddMetric",
    "pointing_game",
    "relevance_mass",
    "relevance_rank_accuracy",
    "PointingGameMetric",
    "RelevanceMassMetric",
    "RelevanceRankAccuracyMetric",
    "perturbation_curve",
    "deletion_auc",
    "insertion_auc",
    "AGREEMENT_METHODS",
    "explanation_agreement",
    "randomizable_layers",
    "RandomizationResult",
    "randomization_sanity_check",
    "MeanMetric",
    "bootstrap_interval",
]
