"""Batch statistics: masked whitening, mean and std over every rank, group std, running moments.

Whatever is batch-wide takes an `all_reduce_sum` that sums a tensor over data-parallel ranks (the
identity on one device), so it is the same on every rank as on one device holding the whole batch.
Shapes: B = responses, T = response tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

AllReduceSum = Callable[[torch.Tensor], torch.Tensor]
STD_EPS = 1e-4  # trl's epsilon under every std it divides by


def identity(tensor: torch.Tensor) -> torch.Tensor:
    """The all-reduce of a single process."""
    return tensor


def masked_whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    all_reduce: AllReduceSum = identity,
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
    mask = mask.to(values.dtype)  # (B, T)
    total, count = all_reduce(torch.stack([(values * mask).sum(), mask.sum()])).unbind()
    if count == 0:
        raise ValueError("cannot whiten: the mask is empty on every rank")  # as trl's masked_var
    mean = total / count
    variance = all_reduce(((values - mean).square() * mask).sum()) / (count - 1)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)  # (B, T)
    return whitened if shift_mean else whitened + mean


def masked_standardize(values: torch.Tensor, mask: torch.Tensor, all_reduce: AllReduceSum = identity) -> torch.Tensor:
    """OpenRLHF's advantage normalisation over every rank's response tokens.

    (x - mean) / sqrt(max(var, 1e-8)), with the mean and the biased (divided by the token count)
    variance of the masked tokens; unlike `masked_whiten`, whose variance is unbiased and whose
    epsilon is added.

    Args:
        values: (B, T) this rank's values.
        mask: (B, T) response mask.
        all_reduce: sums a tensor over ranks; the identity in one process.

    Returns:
        (B, T) normalised values (not masked).
    """
    mask = mask.to(values.dtype)  # (B, T)
    total, count = all_reduce(torch.stack([(values * mask).sum(), mask.sum()])).unbind()
    if count == 0:
        raise ValueError("cannot normalise: the mask is empty on every rank")
    mean = total / count
    variance = all_reduce(((values - mean).square() * mask).sum()) / count
    return (values - mean) * variance.clamp(min=1e-8).rsqrt()  # (B, T)


def global_mean_std(x: torch.Tensor, all_reduce_sum: AllReduceSum = identity) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased std of `x` (N,) over every rank's values (trl's `nanstd`, without NaNs)."""
    count_sum = all_reduce_sum(torch.stack([x.new_tensor(float(x.numel())), x.sum()]))
    count, mean = count_sum[0], count_sum[1] / count_sum[0]
    sq = all_reduce_sum(((x - mean) ** 2).sum())
    return mean, torch.sqrt(sq / (count - 1))


def group_reward_std(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """(N / k,) unbiased std of the rewards (N,) within each group of k consecutive rows (trl logs
    their mean as `reward_std`)."""
    return rewards.view(-1, k).std(dim=1)


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
