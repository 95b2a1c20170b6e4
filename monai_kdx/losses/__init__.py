"""Losses: knowledge distillation terms (registered in ``DISTILLATION_LOSSES``) and saliency
regularization losses (registered in ``SALIENCY_LOSSES``)."""

from __future__ import annotations

from .distillation import (
    AttentionTransferLoss,
    DistillationLoss,
    DistillationTerm,
    ExplanationDistillationLoss,
    FeatureHintLoss,
    KnowledgeDistillationLoss,
    attention_map,
    match_spatial,
)
from .saliency import (
    SALIENCY_DIVERGENCES,
    SALIENCY_METHODS,
    GAINLoss,
    RightForTheRightReasonsLoss,
    SaliencyAlignmentLoss,
    SaliencyContext,
    SaliencyLoss,
    saliency_divergence,
)

__all__ = [
    "SALIENCY_DIVERGENCES",
    "SALIENCY_METHODS",
    "GAINLoss",
    "RightForTheRightReasonsLoss",
    "SaliencyAlignmentLoss",
    "SaliencyContext",
    "SaliencyLoss",
    "saliency_divergence",
    "AttentionTransferLoss",
    "DistillationLoss",
    "DistillationTerm",
    "ExplanationDistillationLoss",
    "FeatureHintLoss",
    "KnowledgeDistillationLoss",
    "attention_map",
    "match_spatial",
]
