"""The estimator interface: how an iteration's scores and KL become advantages, and the loss.

An estimator is chosen once, by name, from the settings (the registry in `__init__.py` is the only
place that maps a name to a class) and the training module asks it, never the name: whether a
value head and a reference pass are needed, the advantages, the loss on a micro-batch and its
statistics, and how that loss is normalised under gradient accumulation.

Shapes: B = responses on this rank (prompts x k, where k = `samples_per_prompt`; the k samples of
a prompt are k consecutive rows, so a group never spans two ranks), T = response tokens.
Advantages are always (B, T), zero on padding: a sequence-level estimator repeats its (B,)
advantage on each response token (`per_token`) and reads it back with `per_sequence`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from detox_lightning.rl.experience import Experience
from detox_lightning.rl.stats import AllReduceSum, identity


@dataclass
class Rollout:
    """One iteration's scored responses on this rank: what advantages are made of.

    Attributes:
        scores: (B,) reward-model scores after the optional EOS penalty, scaling and clipping.
        mask: (B, T) float response mask.
        kl: (B, T) the chosen per-token KL estimate (`kl_penalty`), zero on padding; None when no
            reference pass ran (then no KL enters training: read as zeros).
        values: (B, T) the value head's predictions (None without one).
        kl_coef: the KL coefficient now (the controller's value).
    """

    scores: torch.Tensor
    mask: torch.Tensor
    kl: torch.Tensor | None = None
    values: torch.Tensor | None = None
    kl_coef: float = 0.0

    def kl_or_zeros(self) -> torch.Tensor:
        """(B, T) the per-token KL, zeros when no reference pass ran."""
        return self.kl if self.kl is not None else torch.zeros_like(self.mask)


def per_token(sequence_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) one value per response -> (B, T) that value on each of its tokens, zero on padding."""
    return sequence_values[:, None] * mask.to(sequence_values.dtype)


def per_sequence(token_values: torch.Tensor) -> torch.Tensor:
    """(B, T) from `per_token` -> (B,) exactly: the first token is a response token in every row
    (`response_mask`), also after `Experience.select` trims the padding."""
    return token_values[:, 0]


class Estimator(ABC):
    """Advantages, loss and statistics of one RL algorithm, built once from the run's settings.

    Args:
        settings: the run's `RLSettings` (read by attribute: `samples_per_prompt`, `cliprange`,
            `gamma`, `init_kl_coef`, ...).
        max_completion_length: the response token cap (`generation.output_max_length`).
    """

    name: ClassVar[str]
    needs_value_head: ClassVar[bool] = False
    min_samples_per_prompt: ClassVar[int] = 1
    # What a token-level loss is divided by, so that splitting a mini-batch into gradient-
    # accumulation micro-batches never changes the update (`num_items` in `loss`):
    #   "step": the response tokens of the whole optimizer step on every rank / world size (dapo,
    #       OpenRLHF's REINFORCE++); "mini_batch": this rank's mini-batch tokens (a token mean, as
    #       trl's PPO computes it when nothing is accumulated); "sequences": no token count (a mean
    #       over sequences; the caller divides by the number of micro-batches, all equally large).
    token_normaliser: ClassVar[Literal["sequences", "mini_batch", "step"]] = "sequences"
    # Whether the loss's ratio is per token or per sequence: a separate sampler's importance
    # weights (`rl.importance`, in `Experience.is_weights`) are taken at the same level.
    ratio_level: ClassVar[Literal["token", "sequence"]] = "token"
    # For the start-up line: how the loss aggregates, and the defaults of the library the
    # estimator comes from, so that a user switching from it sees where this run differs.
    loss_description: ClassVar[str] = ""
    reference_defaults: ClassVar[str] = ""

    def __init__(self, settings: Any, max_completion_length: int | None = None) -> None:
        self.settings = settings
        self.k = settings.samples_per_prompt
        self.max_completion_length = max_completion_length

    @property
    def needs_reference(self) -> bool:
        """Whether any KL to the reference enters training: not with a coefficient of 0, which no
        controller moves (the adaptive one multiplies it), so the reference pass is skipped."""
        return self.settings.init_kl_coef != 0

    def describe(self) -> str:
        """One line: the effective KL coefficient and loss aggregation, beside the reference defaults."""
        s = self.settings
        if not self.needs_reference:
            beta = "0 (no reference pass)"
        elif s.adap_kl_ctrl:
            beta = f"{s.init_kl_coef:g}, adaptive (target {s.target:g}, horizon {s.horizon})"
        else:
            beta = f"{s.init_kl_coef:g}, fixed"
        line = f"estimator {self.name}, k = {self.k}: KL coefficient {beta}; loss: {self.loss_description}"
        return line + (f" ({self.reference_defaults})" if self.reference_defaults else "")

    @classmethod
    def problems(cls, settings: Any) -> list[str]:
        """This estimator's own setting problems, one line each naming the flag (none by default)."""
        return []

    @abstractmethod
    def advantages(
        self, rollout: Rollout, all_reduce_sum: AllReduceSum = identity
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T) advantages, zero on padding, and (B, T) returns (None where there are none).

        `all_reduce_sum` sums a tensor over ranks: batch-wide normalisation uses every rank's rows.
        """

    @abstractmethod
    def loss(
        self,
        mb: Experience,
        logprobs: torch.Tensor,
        values: torch.Tensor | None,
        kl_coef: float,
        num_items: float | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss on micro-batch `mb` and its trl-named statistics (`ppo/loss/total` among them).

        Args:
            mb: the micro-batch's rollout (b rows, trimmed to its t response tokens).
            logprobs: (b, t) the policy's log-probs now; values: (b, t) its value predictions
                (None without a value head).
            kl_coef: the KL coefficient now.
            num_items: the token count a token-level loss is divided by (`token_normaliser`);
                None for a mean over sequences.
        """

    def advantage_stats(self, exp: Experience, all_reduce_sum: AllReduceSum = identity) -> dict[str, torch.Tensor]:
        """Means over every rank's response tokens of the advantages (and returns, values)."""
        parts = {"ppo/policy/advantages_mean": exp.advantages, "ppo/returns/mean": exp.returns, "ppo/val/mean": exp.values}
        parts = {name: value for name, value in parts.items() if value is not None}
        sums = all_reduce_sum(torch.stack([(value * exp.mask).sum() for value in parts.values()] + [exp.mask.sum()]))
        return dict(zip(parts, sums[:-1] / sums[-1], strict=True))


class SequenceEstimator(Estimator):
    """An estimator with one advantage per response (rloo, grpo): k >= 2 samples per prompt."""

    min_samples_per_prompt: ClassVar[int] = 2

    def advantage_stats(self, exp: Experience, all_reduce_sum: AllReduceSum = identity) -> dict[str, torch.Tensor]:
        """The mean over every rank's responses of their advantage."""
        advantages = per_sequence(exp.advantages)  # (B,)
        total, count = all_reduce_sum(torch.stack([advantages.sum(), advantages.new_tensor(float(len(advantages)))]))
        return {"ppo/policy/advantages_mean": total / count}
