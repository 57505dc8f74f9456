"""Evaluation measurements and statistics, as `evaluate` modules defined in code (offline).

`evaluate.load("toxicity")` and `evaluate.load("rouge")` fetch scripts from the hub and fail
offline, so the measurements are `evaluate` modules of our own: `Rouge` wraps `rouge-score`, as
the hub's rouge module does; `Toxicity` (the hub's toxicity number from any reward component)
lives beside the rewards, in `detox_lightning.rewards.measurement`.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np


class Rouge(evaluate.Metric):
    """Per-text ROUGE-1/2/L F-measures (stemmed), as the hub's `rouge` with `use_aggregator=False`."""

    ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="ROUGE F-measures through the rouge-score package.",
            citation="",
            inputs_description="predictions and references: lists of texts",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions: list[str], references: list[str]) -> dict:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(list(self.ROUGE_TYPES), use_stemmer=True)
        scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references, strict=True)]
        return {name: [s[name].fmeasure for s in scores] for name in self.ROUGE_TYPES}


def paired_bootstrap_ci(
    before: np.ndarray, after: np.ndarray, resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of `after - before` over pairs and its percentile-bootstrap confidence interval.

    Pairs are resampled together, so the interval reflects the per-prompt differences and not
    the spread between prompts.

    Returns:
        (mean difference, lower bound, upper bound).
    """
    diff = np.asarray(after, dtype=np.float64) - np.asarray(before, dtype=np.float64)
    if diff.ndim != 1 or diff.size == 0:
        raise ValueError(f"need a non-empty 1-D array of pairs, got shape {diff.shape}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, diff.size, size=(resamples, diff.size))
    means = diff[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(diff.mean()), float(low), float(high)


def summarize(values: np.ndarray) -> dict[str, float]:
    """Mean, population std (as the notebook's np.std) and the fraction of values above 0.5."""
    values = np.asarray(values, dtype=np.float64)
    return {"mean": float(values.mean()), "std": float(values.std()), "frac_above_0.5": float((values > 0.5).mean())}


def improvement_pct(before: float, after: float) -> float:
    """The notebook's "percentage improvement": (before - after) / before, in percent."""
    return float("nan") if before == 0 else 100.0 * (before - after) / before
