"""A reward component's toxicity as an `evaluate` measurement defined in code (offline).

`evaluate.load("toxicity")` fetches its script from the hub and fails offline; this computes the
same number (the probability of the toxic label) with any `RewardModel`'s `toxicity` as the
classifier, so evaluation, judges and monitors report it through `evaluate` as the hub's does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import datasets
import evaluate


class Toxicity(evaluate.Measurement):
    """Probability of the toxic label for each text, from `toxicity_fn(texts)`."""

    def __init__(self, toxicity_fn: Callable[[list[str]], Sequence[float]], **kwargs) -> None:
        super().__init__(**kwargs)
        self.toxicity_fn = toxicity_fn

    def _info(self) -> evaluate.MeasurementInfo:
        return evaluate.MeasurementInfo(
            description="Probability of the toxic label under a classifier (as the hub's 'toxicity').",
            citation="",
            inputs_description="predictions: list of texts",
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions: list[str]) -> dict:
        return {"toxicity": [float(x) for x in self.toxicity_fn(list(predictions))]}
