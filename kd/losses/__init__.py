"""Losses: ``loss(student_logits, teacher_logits, target) -> scalar``, one small module per family."""

from kd.losses.at import AttentionTransfer
from kd.losses.base import DistillationLoss, Features, FeatureStages
from kd.losses.ce import LabelCrossEntropy
from kd.losses.combined import WeightedSum
from kd.losses.crd import ContrastiveRepresentationKD
from kd.losses.deit import DeiTDistillation
from kd.losses.dist import DIST
from kd.losses.dkd import DecoupledKD
from kd.losses.dml import SymmetricKL
from kd.losses.feature_kd import FeatureKD
from kd.losses.fitnet import FitNet
from kd.losses.hard_kd import HardLabelKD
from kd.losses.kd import HintonKD
from kd.losses.pkt import ProbabilisticKnowledgeTransfer
from kd.losses.reviewkd import ReviewKD
from kd.losses.rkd import RelationalKD
from kd.losses.soft_ce import SoftTargetCrossEntropy
from kd.losses.sp import SimilarityPreserving

__all__ = [
    "DIST",
    "AttentionTransfer",
    "ContrastiveRepresentationKD",
    "DecoupledKD",
    "DeiTDistillation",
    "DistillationLoss",
    "FeatureKD",
    "FeatureStages",
    "Features",
    "FitNet",
    "HardLabelKD",
    "HintonKD",
    "LabelCrossEntropy",
    "ProbabilisticKnowledgeTransfer",
    "RelationalKD",
    "ReviewKD",
    "SimilarityPreserving",
    "SoftTargetCrossEntropy",
    "SymmetricKL",
    "WeightedSum",
]
