"""The KL coefficient: fixed, or adapted towards a target KL (Ziegler et al., 2019)."""

from __future__ import annotations


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


def kl_controller(init_kl_coef: float, adaptive: bool, target: float, horizon: int) -> FixedKLController:
    """The adaptive controller, or a fixed one when `adaptive` is False."""
    return AdaptiveKLController(init_kl_coef, target, horizon) if adaptive else FixedKLController(init_kl_coef)
