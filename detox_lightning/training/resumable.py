"""What makes an RL run restartable and guardable: RNG states in a form checkpoints can hold,
per-rank RNG streams, snapshots for the non-finite guard's rollback, the base model's fingerprint,
and the checkpoint hooks that save and restore them.

Lightning restores the module, optimizer, loop progress and callback states on
`fit(ckpt_path=...)`, but no RNG state: without `ppo_state["rng"]` a resumed run samples other
responses than an uninterrupted one. The data position is the loader's (`data.sampler`), the
checkpoint files are `io.checkpoint`'s.

`ResumableRLMixin` is mixed into `RLDetoxModule`, which provides `policy`, `policy_config`,
`kl_ctl`, `score_moments`, `skips` and the `DataParallelMixin` reductions.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn

from detox_lightning.errors import ConfigError
from detox_lightning.io.checkpoint import iterations_done

# ---- RNG states (plain tensors and ints, so that `weights_only` loading accepts them) ----


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
    """Set the states `capture_rng_states` took (CUDA's only on as many devices as saved them)."""
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


# ---- the module's restart and rollback plumbing ----


class ResumableRLMixin:
    """Exact resume (RNG per rank, controller and score statistics) and the guard's snapshots."""

    _resumed_rng = None  # RNG states of a checkpoint, set at its first iteration
    _resumed_rng_shared = False  # those states are one rank's, for every rank

    def on_train_start(self) -> None:
        # A resumed run then restores each rank's saved state at its first iteration.
        self.split_rng_by_rank()

    def split_rng_by_rank(self) -> None:
        """One sampling stream per rank under data parallelism (a no-op on one device).

        Every rank starts from the same state (`seed_everything`, or torch's fixed default seed),
        so without this every rank would draw the same sampling noise for its own prompts. The
        draw below is the same on every rank; adding the rank separates the streams.
        """
        if self.world_size > 1:
            torch.manual_seed(int(torch.randint(0, 2**62, (1,)).item()) + self.global_rank)

    def restore_resumed_rng(self) -> None:
        """Set the RNG states saved with the checkpoint, at the first iteration after a resume.

        Done here rather than at load time, because Lightning draws from the global RNG between
        loading and the first batch; this way iteration k+1 samples as in an uninterrupted run.
        """
        if self._resumed_rng is not None:
            restore_rng_states(self._resumed_rng)
            if self._resumed_rng_shared:  # one saved state for every rank: split it again
                self.split_rng_by_rank()
            self._resumed_rng = None

    weights_iteration = 0  # the iteration whose update the trainable weights hold (0: the starting adapter)

    def snapshot(self) -> dict:
        """What one iteration changes: trainable weights (and the iteration they are from),
        optimizer state, score statistics."""
        return {
            "weights_iteration": self.weights_iteration,
            "weights": {name: p.detach().clone() for name, p in self.trainable_parameters().items()},
            "optimizer": copy.deepcopy(self.optimizers().optimizer.state_dict()),
            "score_moments": self.score_moments.state_dict(),
        }

    def restore(self, snapshot: dict) -> None:
        with torch.no_grad():
            for name, param in self.trainable_parameters().items():
                param.copy_(snapshot["weights"][name])
        optimizer = self.optimizers().optimizer
        optimizer.load_state_dict(snapshot["optimizer"])
        optimizer.zero_grad()
        self.score_moments.load_state_dict(snapshot["score_moments"])
        self.weights_iteration = snapshot["weights_iteration"]

    def base_fingerprint(self) -> dict:
        """Identifies the frozen base model: its shape settings and a checksum of its embeddings."""
        if not hasattr(self, "_base_fingerprint"):
            config = self.policy.pretrained_model.config
            keys = ("model_type", "vocab_size", "d_model", "d_ff", "num_layers", "num_decoder_layers", "num_heads")
            fingerprint = {k: getattr(config, k, None) for k in keys}
            embeddings = self.policy.pretrained_model.get_input_embeddings().weight
            fingerprint["embedding_abs_sum"] = float(embeddings.detach().double().abs().sum())
            self._base_fingerprint = fingerprint
        return dict(self._base_fingerprint)

    def check_base_fingerprint(self, saved: dict) -> None:
        own = self.base_fingerprint()
        differ = [k for k in own if k != "embedding_abs_sum" and saved.get(k) != own[k]]
        a, b = saved.get("embedding_abs_sum"), own["embedding_abs_sum"]
        if a is not None and not math.isclose(a, b, rel_tol=1e-3):  # bf16 vs fp32 agree to ~1e-4
            differ.append("embedding_abs_sum")
        if differ:
            pairs = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs model {own[k]!r}" for k in differ)
            raise ConfigError(
                f"checkpoint was saved for another base model than model.policy.model_name_or_path="
                f"{self.policy_config.model_name_or_path!r} ({pairs})"
            )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Plain tensors, numbers and strings only: the file loads with torch.load(weights_only=True).
        guard = self.skips
        checkpoint["ppo_state"] = {
            "kl_controller": self.kl_ctl.state_dict(),
            "score_moments": self.score_moments.state_dict(),
            "policy": asdict(self.policy_config),
            "base_model": self.base_fingerprint(),
            "iterations": iterations_done(self.trainer) if self._trainer is not None else 0,
            "weights_iteration": self.weights_iteration,  # older than `iterations` after a rollback or a skip
            "skipped_iterations": guard.total,
            "consecutive_skips": guard.consecutive,
            "rng": capture_rng_states(),
            "rng_per_rank": self.rng_states_of_every_rank(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("ppo_state")
        if state is None:
            raise ConfigError("the checkpoint has no 'ppo_state': it was not written by RLDetoxModule")
        if "base_model" in state:
            self.check_base_fingerprint(state["base_model"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.score_moments.load_state_dict(state["score_moments"])
        self.weights_iteration = int(state.get("weights_iteration", state.get("iterations", 0)))
        guard = self.skips
        guard.total, guard.consecutive = state.get("skipped_iterations", 0), state.get("consecutive_skips", 0)
        self._resumed_rng, self._resumed_rng_shared = state.get("rng"), True
        per_rank = state.get("rng_per_rank") or []
        if len(per_rank) == self.world_size:
            # each rank goes on with its own stream
            self._resumed_rng, self._resumed_rng_shared = per_rank[self.global_rank], False
        elif per_rank:
            rank_zero_warn(
                f"checkpoint was saved by {len(per_rank)} ranks, resumed on {self.world_size}: every rank "
                f"starts from rank 0's saved random state, split by rank, so sampling differs from an "
                f"uninterrupted run"
            )

    def rng_states_of_every_rank(self) -> list[dict]:
        """Every rank's RNG states, rank 0's first (all ranks dump a checkpoint; rank 0 writes it)."""
        if self.world_size == 1:
            return [capture_rng_states()]
        states = [None] * self.world_size
        torch.distributed.all_gather_object(states, capture_rng_states())
        return states
