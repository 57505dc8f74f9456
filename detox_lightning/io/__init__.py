"""Files that outlive the process: the atomic writer every output goes through, and the lean,
restartable checkpoints."""

from detox_lightning.io.checkpoint import PPOCheckpoint, RLCheckpoint

__all__ = ["PPOCheckpoint", "RLCheckpoint"]
