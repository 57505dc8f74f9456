"""PPO math as pure functions on `(batch, tokens)` tensors plus a response mask.

No Lightning, no models: everything here is unit-tested against hand values and naive loops.
Shapes: B = batch, T = response tokens. `mask` is 1.0 on response tokens (up to and including
EOS), 0.0 on padding after it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

from detox_lightning.trl_compat import masked_mean

KLPenalty = Literal["k1", "abs", "mse", "full"]


def response_mask(response_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Mask of the response tokens: every generated token up to and including the first EOS.

    `response_ids` must not contain the decoder start token. The mask comes from the EOS position,
    not from `!= pad`, because T5's pad id is also a token the policy may sample.

    Args:
        response_ids: (B, T) generated tokens.
        eos_token_id: the end-of-sequence id.

    Returns:
        (B, T) bool mask.
    """
    is_eos = response_ids == eos_token_id
    eos_seen_before = (is_eos.cumsum(dim=1) - is_eos.long()) > 0  # an EOS strictly before t
    return ~eos_seen_before


def per_token_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: KLPenalty = "k1") -> torch.Tensor:
    """Per-token KL estimate between policy and reference on the sampled tokens.

    Args:
        logprobs: (B, T) policy log-probs of the sampled tokens.
        ref_logprobs: (B, T) reference log-probs of the same tokens.
        kind: `k1` (log-ratio, trl's default), `abs` (|log-ratio|) or `mse` (half squared log-ratio).
            `full` needs whole distributions: use `full_kl`.
    """
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "abs":
        return log_ratio.abs()
    if kind == "mse":
        return 0.5 * log_ratio.square()
    raise ValueError(f"kl penalty {kind!r} is not computed from sampled log-probs; expected k1, abs or mse")


def full_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Exact per-token KL(policy || reference) over the whole vocabulary, in float32.

    Args:
        logits: (B, T, V) policy logits (already divided by the temperature).
        ref_logits: (B, T, V) reference logits (likewise).

    Returns:
        (B, T) KL per position.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    ref_logp = torch.log_softmax(ref_logits.float(), dim=-1)
    return (logp.exp() * (logp - ref_logp)).sum(dim=-1)


def shape_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: `-kl_coef * kl` on every response token, plus the score on the last one.

    Args:
        scores: (B,) sequence-level reward-model scores.
        kl: (B, T) per-token KL estimate.
        mask: (B, T) response mask (a prefix of ones per row).
        kl_coef: the KL penalty coefficient.

    Returns:
        (B, T) rewards, zero outside the mask.
    """
    mask = mask.to(kl.dtype)
    rewards = -kl_coef * kl * mask
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)  # (B,) index of the last response token
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores.to(rewards.dtype)
    return rewards


def gae(
    values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, vectorised over tokens (no Python loop).

    A_t = sum_{k >= t} (gamma * lam)^(k - t) * delta_k with delta_t = r_t + gamma * V_{t+1} - V_t,
    and V = 0 after the last response token.

    Args:
        values: (B, T) value predictions of the rollout.
        rewards: (B, T) shaped per-token rewards.
        mask: (B, T) response mask.
        gamma: discount factor.
        lam: GAE lambda.

    Returns:
        advantages (B, T) (not whitened) and returns = advantages + values, both zero outside the mask.
    """
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    next_values = torch.nn.functional.pad(values[:, 1:], (0, 1))
    deltas = rewards + gamma * next_values - values  # (B, T)
    t = torch.arange(values.shape[1], device=values.device, dtype=values.dtype)
    exponent = t[None, :] - t[:, None]  # (T, T): k - t
    # 0 ** 0 == 1 keeps lam * gamma == 0 exact; the triangle keeps only k >= t.
    discount = torch.pow(torch.tensor(gamma * lam, dtype=values.dtype, device=values.device), exponent.clamp(min=0))
    discount = torch.triu(discount)
    advantages = (deltas @ discount.T) * mask
    returns = (advantages + values) * mask
    return advantages, returns


def masked_whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    shift_mean: bool = True,
) -> torch.Tensor:
    """trl's `masked_whiten` over the union of every rank's batch (mean and unbiased variance).

    Two reductions of two and one scalars (masked sum and count, then the masked sum of squared
    deviations), so the result equals trl's on the concatenated batch to rounding.

    Args:
        values: (B, T) this rank's values, e.g. advantages.
        mask: (B, T) response mask.
        all_reduce: sums a tensor over ranks (and returns it); the identity in one process.
        shift_mean: False adds the mean back, as trl's.

    Returns:
        (B, T) whitened values (not masked).
    """
    mask = mask.to(values.dtype)
    total, count = all_reduce(torch.stack([(values * mask).sum(), mask.sum()])).unbind()
    if count == 0:
        raise ValueError("cannot whiten: the mask is empty on every rank")  # as trl's masked_var
    mean = total / count
    variance = all_reduce(((values - mean).square() * mask).sum()) / (count - 1)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    return whitened if shift_mean else whitened + mean


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate loss.

    Returns:
        loss (masked mean of max(-A r, -A clip(r))), clipfrac (fraction of tokens where the clip
        was active) and approxkl (0.5 * masked mean of the squared log-ratio), all scalars.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    losses = -advantages * ratio
    losses_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(losses, losses_clipped), mask)
    clipfrac = masked_mean((losses_clipped > losses).to(logprobs.dtype), mask)
    approxkl = 0.5 * masked_mean(log_ratio.square(), mask)
    return loss, clipfrac, approxkl


def value_loss(
    vpred: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: 0.5 * masked mean of max(unclipped, clipped) squared errors.

    Returns:
        loss and clipfrac (fraction of tokens where the clipped error was the larger), scalars.
    """
    vpred_clipped = old_values + torch.clamp(vpred - old_values, -cliprange_value, cliprange_value)
    losses = (vpred - returns).square()
    losses_clipped = (vpred_clipped - returns).square()
    loss = 0.5 * masked_mean(torch.max(losses, losses_clipped), mask)
    clipfrac = masked_mean((losses_clipped > losses).to(vpred.dtype), mask)
    return loss, clipfrac


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, init_kl_coef: float) -> None:
        self.value = float(init_kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Adaptive KL coefficient of Ziegler et al. (2019), as in trl's classic PPO trainer.

    value <- value * (1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon)
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        super().__init__(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon


class RunningMoments:
    """Running mean and standard deviation of scores over the whole run (for score scaling).

    Batches are merged with Chan et al.'s parallel update, so the result equals the moments of
    all scores seen so far.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.var = 1.0
        self.count = 0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def update(self, xs: torch.Tensor) -> None:
        xs = xs.double()
        n = xs.numel()
        batch_mean = xs.mean().item()
        batch_var = xs.var(unbiased=False).item()
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        self.count = total

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])
