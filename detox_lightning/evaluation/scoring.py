"""How a run judges responses, shared by every callback that scores them.

The toxicity evaluation decides what the classifiers see (`text`), which judge, if any, scores
beside the reward, and the response cap; the rollout monitor and the prediction writer score as
it does. They find its settings as a `Scoring` on the run's callbacks (`run_scoring`), so that
no callback imports another.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning.pytorch as pl
import numpy as np

from detox_lightning.rewards.classifiers import RewardModel, RewardText


@dataclass(frozen=True)
class Scoring:
    """The evaluation's scoring settings.

    Attributes:
        text: what the classifiers see, `query_response` or `response` (as `reward_texts`).
        judge: a second classifier that scores beside the reward; None: the reward alone.
        max_new_tokens: the evaluation's response cap.
    """

    text: RewardText
    judge: RewardModel | None
    max_new_tokens: int


def run_scoring(trainer: pl.Trainer, with_judge: bool = False) -> Scoring | None:
    """The `scoring` of the first of the trainer's callbacks that has one (with a judge, if asked); None without."""
    for callback in trainer.callbacks:
        scoring = getattr(callback, "scoring", None)
        if isinstance(scoring, Scoring) and (scoring.judge is not None or not with_judge):
            return scoring
    return None


def toxicity_of(scorer: RewardModel, queries: list[str], responses: list[str], text: RewardText) -> np.ndarray:
    """Toxicity (N,) of each (query, response) pair under `scorer`, on the reward's texts.

    Args:
        scorer: the reward component or a judge (`RewardModel.pair_toxicity`).
        queries: one prompt per response.
        responses: the decoded responses.
        text: `query_response` or `response`, as `reward_texts`.
    """
    return np.asarray(scorer.pair_toxicity(queries, responses, text).tolist(), dtype=np.float64)
