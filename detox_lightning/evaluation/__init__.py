"""Judging a run: the toxicity evaluation callback, the rollout monitor, the best-adapter choice,
predictions, and the measurements they share."""

from detox_lightning.evaluation.monitor import RolloutMonitor
from detox_lightning.evaluation.predict import PredictionWriter
from detox_lightning.evaluation.toxicity import ToxicityEvaluation

__all__ = ["PredictionWriter", "RolloutMonitor", "ToxicityEvaluation"]
