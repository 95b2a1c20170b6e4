"""Losses: knowledge distillation terms (registered in ``DISTILLATION_LOSSES``)."""

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

__all__ = [
    "AttentionTransferLoss",
    "DistillationLoss",
    "DistillationTerm",
    "ExplanationDistillationLoss",
    "FeatureHintLoss",
    "KnowledgeDistillationLoss",
    "attention_map",
    "match_spatial",
]
