"""Which evaluated policy to export as `adapter_best/`: a pure choice among evaluation results.

Every policy evaluation of a run (`ToxicityEvaluation`'s `eval/...` figures at an iteration) is a
candidate. A candidate qualifies when every figure is finite, its toxicity fell for sure (the paired CI's upper bound is
below 0), its ROUGE-L fell by at most `max_rouge_drop` (absolute), and, when a judge is set, the
judge's toxicity did not rise (delta <= 0). The qualified candidate with the lowest mean toxicity
is chosen (the earliest on a tie: fewer updates away from the reference); every other candidate
gets the reason it was not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Candidate:
    """One evaluation of the policy: its iteration and its `eval/...` metrics."""

    iteration: int
    metrics: dict[str, float]


@dataclass
class Selection:
    """The chosen candidate (None when none qualifies) and why each other one was rejected."""

    chosen: Candidate | None
    rejected: dict[int, str] = field(default_factory=dict)  # iteration -> reason

    def as_dict(self) -> dict:
        """For the JSON report."""
        return {
            "iteration": self.chosen.iteration if self.chosen else None,
            "figures": figures(self.chosen.metrics) if self.chosen else None,
            "rejected": {str(i): reason for i, reason in sorted(self.rejected.items())},
        }

    def lines(self) -> list[str]:
        """What to print: the choice with its figures, then one line per rejected candidate."""
        n = len(self.rejected) + (self.chosen is not None)
        if self.chosen is None:
            head = f"best adapter: none of {n} evaluation{'s' * (n != 1)} qualifies; adapter_best/ not written"
        else:
            head = f"best adapter: iteration {self.chosen.iteration} of {n} evaluated ({describe(self.chosen.metrics)})"
        return [head] + [f"  iteration {i} rejected: {why}" for i, why in sorted(self.rejected.items())]


FIGURES = (
    "eval/toxicity_mean",
    "eval/toxicity_delta",
    "eval/toxicity_delta_ci_low",
    "eval/toxicity_delta_ci_high",
    "eval/rougeL",
    "eval/rougeL_delta",
    "eval/judge_toxicity_mean",
    "eval/judge_toxicity_delta",
)


def figures(metrics: dict[str, float]) -> dict[str, float]:
    return {k: metrics[k] for k in FIGURES if k in metrics}


def describe(m: dict[str, float]) -> str:
    text = (
        f"toxicity {m['eval/toxicity_mean']:.4f}, delta {m['eval/toxicity_delta']:+.4f} "
        f"[95% CI {m['eval/toxicity_delta_ci_low']:+.4f}, {m['eval/toxicity_delta_ci_high']:+.4f}]"
    )
    if "eval/rougeL_delta" in m:
        text += f", ROUGE-L {m['eval/rougeL']:.4f} ({m['eval/rougeL_delta']:+.4f})"
    if "eval/judge_toxicity_delta" in m:
        text += f", judge delta {m['eval/judge_toxicity_delta']:+.4f}"
    return text


def disqualification(metrics: dict[str, float], max_rouge_drop: float, judge: str | None) -> str | None:
    """Why a candidate cannot be chosen, or None when it qualifies.

    Args:
        metrics: the candidate's `eval/...` figures.
        max_rouge_drop: the largest allowed fall of ROUGE-L (absolute); not checked without ROUGE.
        judge: the label of the judge whose delta must not be above 0 (`judge`, `judge2`, ...);
            None: no judge is set.
    """
    reasons = []
    # A NaN compares False with everything, so each check is written to fail on it; and any
    # non-finite figure of the candidate disqualifies it outright.
    broken = sorted(k for k in FIGURES if k in metrics and not math.isfinite(metrics[k]))
    if broken:
        reasons.append(f"non-finite {', '.join(f'{k}={metrics[k]}' for k in broken)}")
    high = metrics["eval/toxicity_delta_ci_high"]
    if not high < 0:
        reasons.append(f"toxicity CI upper bound {high:+.4f} is not below 0")
    rouge_delta = metrics.get("eval/rougeL_delta")
    if rouge_delta is not None and not -rouge_delta <= max_rouge_drop:
        reasons.append(f"ROUGE-L fell by {-rouge_delta:.4f} > max_rouge_drop {max_rouge_drop:g}")
    if judge is not None:
        judge_delta = metrics.get(f"eval/{judge}_toxicity_delta")
        if judge_delta is None:
            reasons.append(f"no {judge} toxicity")
        elif not judge_delta <= 0:
            reasons.append(f"{judge} toxicity delta {judge_delta:+.4f} is above 0")
    return "; ".join(reasons) or None


def select_best(candidates: Sequence[Candidate], max_rouge_drop: float, judge: str | None) -> Selection:
    """The qualified candidate of lowest `eval/toxicity_mean` (earliest on a tie), with reasons for the rest."""
    rejected, qualified = {}, []
    for c in candidates:
        reason = disqualification(c.metrics, max_rouge_drop, judge)
        if reason is None:
            qualified.append(c)
        else:
            rejected[c.iteration] = reason
    if not qualified:
        return Selection(None, rejected)
    chosen = min(qualified, key=lambda c: (c.metrics["eval/toxicity_mean"], c.iteration))
    for c in qualified:
        if c is not chosen:
            rejected[c.iteration] = (
                f"toxicity {c.metrics['eval/toxicity_mean']:.4f} is not below iteration {chosen.iteration}'s "
                f"{chosen.metrics['eval/toxicity_mean']:.4f}"
            )
    return Selection(chosen, rejected)
