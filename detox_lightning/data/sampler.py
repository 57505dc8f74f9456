"""The data position of a restartable run: an order fixed by (seed, epoch) and a loader that
remembers how far into it the epoch got.

What Lightning 2.6.6 does with the train loader on `fit(ckpt_path=...)` (read from its source):

- Mid-epoch it does not skip the batches already seen; it only hands a train DataLoader that has
  `state_dict`/`load_state_dict` its saved state before iterating again (`ResumableDataLoader`).
- Under DDP it rebuilds the train loader around `DistributedSamplerWrapper(our sampler,
  shuffle=True, seed=PL_GLOBAL_SEED)`, which shuffles our order again with its own seed; the
  loader's state must carry both seeds (`unwrap_sampler`), or a resume under another
  `seed_everything` sees other prompts.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler


class EpochSeededSampler(Sampler[int]):
    """A random order fixed by (seed, epoch): the same after a restart, a new one each epoch.

    Args:
        num_samples: dataset length.
        seed: base seed of the shuffle.
    """

    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this before each epoch
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples


def unwrap_sampler(sampler: Any) -> tuple[Any, Any | None]:
    """(the sampler the loader was built with, Lightning's DDP wrapper around it or None).

    Under DDP Lightning 2.6.6 rebuilds the train loader with `DistributedSamplerWrapper(ours,
    shuffle=True, seed=PL_GLOBAL_SEED, num_replicas, rank)` (`_get_distributed_sampler` in
    trainer/connectors/data_connector.py); the wrapper keeps ours as `.dataset._sampler`
    (fabric/utilities/distributed.py), lists its order and permutes that again with its own seed
    before taking this rank's share.
    """
    inner = getattr(getattr(sampler, "dataset", None), "_sampler", None)
    return (inner, sampler) if inner is not None else (sampler, None)


class ResumableDataLoader(DataLoader):
    """A DataLoader that remembers how many batches of the current epoch it handed out.

    Lightning saves `state_dict()` with the fit loop and, on a mid-epoch restart, calls
    `load_state_dict()` before iterating again; the next pass then skips the batches already
    trained on. Counting batches handed out (not indices drawn) is exact with worker prefetching.
    Expects an `EpochSeededSampler` (or any sampler with `seed` and `epoch`) so the order repeats.
    Both seeds that fix the order are saved: ours (`seed`) and, under DDP, that of Lightning's
    wrapper (`shard_seed`); a resume under another `seed_everything` would change either.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._served = 0
        self._resume: tuple[int, int] | None = None  # (epoch, batches to skip)

    def __iter__(self) -> Iterator[Any]:
        epoch = getattr(self.sampler, "epoch", 0)
        skip = self._resume[1] if self._resume is not None and self._resume[0] == epoch else 0
        self._resume, self._served = None, 0
        for i, batch in enumerate(super().__iter__()):
            self._served = i + 1
            if i >= skip:
                yield batch

    def state_dict(self) -> dict[str, int]:
        ours, wrapper = unwrap_sampler(self.sampler)
        state = {
            "epoch": getattr(self.sampler, "epoch", 0),
            "batches_served": self._served,
            "seed": getattr(ours, "seed", 0),
        }
        if wrapper is not None:
            state["shard_seed"] = wrapper.seed
        return state

    def load_state_dict(self, state: dict[str, int]) -> None:
        ours, wrapper = unwrap_sampler(self.sampler)
        if hasattr(ours, "seed"):
            ours.seed = state["seed"]
        if wrapper is not None and "shard_seed" in state:  # absent when saved on one device
            wrapper.seed = state["shard_seed"]
        self._resume = (state["epoch"], state["batches_served"])
