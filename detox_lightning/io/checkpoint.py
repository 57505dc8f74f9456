"""Restartable runs: checkpoints every N PPO iterations written atomically, RNG states, data position.

What Lightning 2.6.6 does and does not do on `fit(ckpt_path=...)` (read from its source):

- It restores the module (`on_load_checkpoint`, then `load_state_dict`), optimizer, loop progress
  and callback states, but no RNG state: a resumed run samples other responses unless the
  module restores them itself (`RLDetoxModule` stores them under `ppo_state["rng"]`).
- Mid-epoch it does not skip the batches already seen; it only hands a train DataLoader that has
  `state_dict`/`load_state_dict` its saved state before iterating again (`ResumableDataLoader`).
- Under DDP it rebuilds the train loader around `DistributedSamplerWrapper(our sampler,
  shuffle=True, seed=PL_GLOBAL_SEED)`, which shuffles our order again with its own seed; the
  loader's state must carry both seeds (`unwrap_sampler`), or a resume under another
  `seed_everything` sees other prompts.
- `ModelCheckpoint.every_n_train_steps` counts optimizer steps (`trainer.global_step`); one PPO
  iteration takes several, so `RLCheckpoint` counts iterations (training batches) instead.
- `ckpt_path="last"` looks for `last.ckpt` only in the new run's own `version_N/checkpoints`,
  which is empty; `RLCheckpoint` also looks in the earlier versions of the same log dir.
- Its own save goes through an fsspec transaction whose temp file lives in the system temp dir,
  so the final move can be a copy across file systems and nothing is fsync'ed; `RLCheckpoint`
  writes next to the target and `os.replace`s it.
- It calls `torch.load(weights_only=None)`, which torch >= 2.6 reads as `weights_only=True`;
  everything we save is plain tensors, numbers, strings and containers, so that works.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Sampler

from detox_lightning.errors import ConfigError

TMP_SUFFIX = ".tmp"


# ---- RNG states (stored as plain tensors and ints, so `weights_only` loading accepts them) ----


def capture_rng_states() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and python RNG states."""
    np_state = np.random.get_state(legacy=False)
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


# ---- the data position ----


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


# ---- checkpoints every N PPO iterations, written atomically ----


def ppo_iterations(trainer: pl.Trainer) -> int:
    """PPO iterations (training batches) run so far, restored on resume."""
    return trainer.fit_loop.epoch_loop.batch_progress.total.processed


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory, so that renames and new entries in it survive a power loss (POSIX only)."""
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync every file under `path` and every directory, `path` included: all of it is on disk."""
    path = Path(path)
    for item in sorted(path.rglob("*"), reverse=True):  # entries before the directories that hold them
        if item.is_file():
            with open(item, "rb") as f:
                os.fsync(f.fileno())
        elif item.is_dir():
            fsync_dir(item)
    fsync_dir(path)


def atomic_replace(tmp: str, path: str) -> None:
    """fsync `tmp`, rename it over `path`, fsync the directory: `path` is the old or the new file."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


class RLCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` that saves every `every_n_iterations` PPO iterations, and at epoch end.

    Files are written to a temp file beside the target and renamed over it, so a kill during a
    save leaves the previous checkpoint intact. `last.ckpt` is always written. `ckpt_path: last`
    finds the newest `last.ckpt` of any earlier version of the same log dir.

    Args:
        every_n_iterations: save after every this many PPO iterations (training batches).
        dirpath: where to write; None: `<log_dir>/checkpoints` of the run.
        filename: file name pattern; `{iteration}`, `{epoch}`, `{step}` (optimizer steps) and
            logged metrics can be used.
        save_top_k: how many numbered checkpoints to keep (-1: all; 0: only `last.ckpt`).
        monitor, mode, save_last, verbose, auto_insert_metric_name: as in `ModelCheckpoint`.
    """

    def __init__(
        self,
        every_n_iterations: int = 1,
        dirpath: str | None = None,
        filename: str = "{epoch}-{iteration}",
        save_top_k: int = 1,
        monitor: str | None = None,
        mode: str = "min",
        save_last: bool = True,
        verbose: bool = False,
        auto_insert_metric_name: bool = True,
    ) -> None:
        if every_n_iterations < 1:
            raise ConfigError(f"RLCheckpoint every_n_iterations={every_n_iterations} must be at least 1")
        if not save_last:
            raise ConfigError("RLCheckpoint save_last=False: last.ckpt is what `--ckpt_path last` resumes from")
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=monitor,
            mode=mode,
            save_last=True,
            save_top_k=save_top_k,
            verbose=verbose,
            auto_insert_metric_name=auto_insert_metric_name,
            every_n_train_steps=0,
            every_n_epochs=0,
        )
        self.every_n_iterations = every_n_iterations
        self._last_iteration_saved = -1

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_iterations=self.every_n_iterations, monitor=self.monitor)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath and os.path.isdir(self.dirpath):
            for stale in Path(self.dirpath).glob(f"*{TMP_SUFFIX}"):
                stale.unlink(missing_ok=True)  # left by a run killed while saving

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if ppo_iterations(trainer) % self.every_n_iterations == 0:
            self.save_now(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save_now(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass  # validation changes no training state; the iteration's checkpoint is written already

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save_now(trainer)

    def save_now(self, trainer: pl.Trainer) -> None:
        if self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def _should_skip_saving_checkpoint(self, trainer: pl.Trainer) -> bool:
        from lightning.pytorch.trainer.states import TrainerFn

        return (
            bool(trainer.fast_dev_run)
            or trainer.state.fn != TrainerFn.FITTING
            or trainer.sanity_checking
            or self._last_iteration_saved == ppo_iterations(trainer)
        )

    def _monitor_candidates(self, trainer: pl.Trainer) -> dict[str, torch.Tensor]:
        candidates = super()._monitor_candidates(trainer)
        candidates["iteration"] = torch.tensor(ppo_iterations(trainer))
        return candidates

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        if not self._fs.protocol or "file" not in self._fs.protocol:
            super()._save_checkpoint(trainer, filepath)  # remote storage: Lightning's own write
        else:
            tmp = filepath + TMP_SUFFIX
            trainer.save_checkpoint(tmp, self.save_weights_only)
            if trainer.is_global_zero:
                atomic_replace(tmp, filepath)
            trainer.strategy.barrier("RLCheckpoint._save_checkpoint")
            self._last_global_step_saved = trainer.global_step
            self._last_checkpoint_saved = filepath
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.after_save_checkpoint(self)
        self._last_iteration_saved = ppo_iterations(trainer)
        if self.verbose:
            rank_zero_info(f"iteration {self._last_iteration_saved}: saved {filepath}")

    def _find_last_checkpoints(self, trainer: pl.Trainer) -> set[str]:
        found = super()._find_last_checkpoints(trainer)
        if self.dirpath is None and trainer.loggers:
            # The new run logs to a new version_N; its predecessors' last.ckpt are the candidates.
            logger = trainer.loggers[0]
            root = Path(logger.save_dir or trainer.default_root_dir) / str(logger.name or "")
            last = re.compile(rf"^{self.CHECKPOINT_NAME_LAST}(-v\d+)?{re.escape(self.FILE_EXTENSION)}$")
            found |= {
                os.path.normpath(p) for p in root.glob("*/checkpoints/*") if last.match(p.name) and p.is_file()
            }
        return found


def load_checkpoint_file(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True`; a missing or unreadable file is a ConfigError."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"ckpt_path={str(path)!r}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"ckpt_path={str(path)!r} is not a readable checkpoint ({type(err).__name__}: {first_line[:200]})"
        ) from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ConfigError(f"ckpt_path={str(path)!r} is not a Lightning checkpoint (no 'state_dict')")
    return checkpoint


class TrainableStateMixin:
    """Lean checkpoints for a LightningModule with a `policy_config`: only trainable tensors.

    Frozen weights reload from their source at start. (trl's value-head wrapper overrides
    `state_dict` in a way that drops the LoRA weights, so the state is read from the parameters.)
    """

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """The trainable tensors only (LoRA, value head)."""
        return {name: p.detach() for name, p in self.trainable_parameters().items()}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True, assign: bool = False):
        own = self.trainable_parameters()
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        wrong = [k for k in own.keys() & state_dict.keys() if own[k].shape != state_dict[k].shape]
        if missing or unexpected or wrong:
            details = []
            if wrong:
                details.append(f"{len(wrong)} with other shapes (e.g. {wrong[0]}: {tuple(state_dict[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)})")
            if missing:
                details.append(f"{len(missing)} missing (e.g. {missing[0]})")
            if unexpected:
                details.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
            raise ConfigError(
                f"checkpoint does not fit model.policy (model_name_or_path={self.policy_config.model_name_or_path!r}, "
                f"lora_r={self.policy_config.lora_r}): trainable tensors {'; '.join(details)}; "
                f"was it saved for another base model or adapter shape?"
            )
        with torch.no_grad():
            for name, param in own.items():
                param.copy_(state_dict[name])


PPOCheckpoint = RLCheckpoint  # the name before RLOO, GRPO and REINFORCE++ joined PPO; old configs still run
