"""Files that outlive the process: atomic writes and lean, resumable checkpoints."""

from detox_lightning.io.checkpoint import PPOCheckpoint, RLCheckpoint

__all__ = ["PPOCheckpoint", "RLCheckpoint"]
