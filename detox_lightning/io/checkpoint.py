"""Checkpoints every N RL iterations, written atomically, and checkpoint loading.

What Lightning 2.6.6 does and does not do on `fit(ckpt_path=...)` (read from its source), and
where this package makes up for it:

- It restores the module (`on_load_checkpoint`, then `load_state_dict`), optimizer, loop progress
  and callback states, but no RNG state: the module restores them itself
  (`training.resumable`).
- Mid-epoch it does not skip the batches already seen (`data.sampler.ResumableDataLoader`).
- `ModelCheckpoint.every_n_train_steps` counts optimizer steps (`trainer.global_step`); one RL
  iteration takes several, so `RLCheckpoint` counts iterations (training batches) instead.
- `ckpt_path="last"` looks for `last.ckpt` only in the new run's own `version_N/checkpoints`,
  which is empty; `RLCheckpoint` also looks in the earlier versions of the same log dir.
- Its own save goes through an fsspec transaction whose temp file lives in the system temp dir,
  so the final move can be a copy across file systems and nothing is fsync'ed; `RLCheckpoint`
  writes next to the target and renames it into place (`io.atomic`).
- It calls `torch.load(weights_only=None)`, which torch >= 2.6 reads as `weights_only=True`;
  everything we save is plain tensors, numbers, strings and containers, so that works.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from detox_lightning.errors import ConfigError
from detox_lightning.io.atomic import publish_file, remove_stale_temps, temp_sibling


def iterations_done(trainer: pl.Trainer) -> int:
    """RL iterations (training batches, one per rollout whatever the estimator) run so far,
    restored on resume: Lightning counts a batch processed before `on_train_batch_end`."""
    return trainer.fit_loop.epoch_loop.batch_progress.total.processed


class RLCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` that saves every `every_n_iterations` RL iterations, and at epoch end.

    Files are written to a temp file beside the target and renamed over it, so a kill during a
    save leaves the previous checkpoint intact. `last.ckpt` is always written. `ckpt_path: last`
    finds the newest `last.ckpt` of any earlier version of the same log dir.

    Args:
        every_n_iterations: save after every this many RL iterations (training batches).
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
            remove_stale_temps(self.dirpath)  # left by a run killed while saving

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if iterations_done(trainer) % self.every_n_iterations == 0:
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
        return (
            bool(trainer.fast_dev_run)
            or trainer.state.fn != TrainerFn.FITTING
            or trainer.sanity_checking
            or self._last_iteration_saved == iterations_done(trainer)
        )

    def _monitor_candidates(self, trainer: pl.Trainer) -> dict[str, torch.Tensor]:
        candidates = super()._monitor_candidates(trainer)
        candidates["iteration"] = torch.tensor(iterations_done(trainer))
        return candidates

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        if not self._fs.protocol or "file" not in self._fs.protocol:
            super()._save_checkpoint(trainer, filepath)  # remote storage: Lightning's own write
        else:
            tmp = str(temp_sibling(filepath))  # every rank dumps (a collective); rank 0 writes
            trainer.save_checkpoint(tmp, self.save_weights_only)
            if trainer.is_global_zero:
                publish_file(tmp, filepath)
            trainer.strategy.barrier("RLCheckpoint._save_checkpoint")
            self._last_global_step_saved = trainer.global_step
            self._last_checkpoint_saved = filepath
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.after_save_checkpoint(self)
        self._last_iteration_saved = iterations_done(trainer)
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


PPOCheckpoint = RLCheckpoint  # the name before RLOO, GRPO and REINFORCE++ joined PPO; old configs still run
