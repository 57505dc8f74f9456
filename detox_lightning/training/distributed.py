"""Reductions over data-parallel ranks for a LightningModule: the identity on one device or without a trainer.

Every statistic the RL step logs or normalises by is global (the same on every rank as on one
device with the whole batch); these are the only places that talk to the other ranks.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel

from detox_lightning.training.guards import NONFINITE_PARTS


class DataParallelMixin:
    """`world_size`, `all_reduce_sum`, `gather`, `on_any_rank` and `gradient_sync` for a LightningModule."""

    def gradient_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        """Under DDP, `no_sync` unless `enabled`: micro-batches accumulate locally and only the
        last of a mini-batch all-reduces the summed gradients (one all-reduce per optimizer step)."""
        model = self.trainer.model if self._trainer is not None else None
        if enabled or not isinstance(model, DistributedDataParallel):
            return contextlib.nullcontext()
        return model.no_sync()

    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over ranks, through the strategy (gloo/NCCL all-reduce under DDP)."""
        if self.world_size == 1:
            return tensor
        return self.trainer.strategy.reduce(tensor.clone(), reduce_op="sum")  # in place: keep the caller's

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """(B, ...) -> (world_size * B, ...): every rank's rows, rank 0's first."""
        if self.world_size == 1:
            return tensor
        return self.trainer.strategy.all_gather(tensor).flatten(0, 1)

    def on_any_rank(self, parts: list[str]) -> list[str]:
        """The `NONFINITE_PARTS` named by `parts` on at least one rank: the same list on every rank."""
        if self.world_size == 1:
            return parts
        flags = torch.tensor([float(name in parts) for name in NONFINITE_PARTS], device=self.device)
        counts = self.all_reduce_sum(flags).tolist()
        return [name for name, count in zip(NONFINITE_PARTS, counts, strict=True) if count > 0]
