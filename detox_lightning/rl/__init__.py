"""Pure RL math on (B, T) tensors plus a mask: KL penalties, controllers, whitening, losses, and
the advantage estimators. torch only: no model, no Lightning."""
