"""Where the modules of the old flat layout went, so that an old path in a user's YAML ends in one
`error:` line naming its new home instead of an import traceback.

Classes users name in YAML are also importable from their subpackage (`detox_lightning.rewards.
HFClassifierReward`, `detox_lightning.evaluation.ToxicityEvaluation`, ...) and the most common from
`detox_lightning` itself; only module paths that no longer exist are listed here.
"""

from __future__ import annotations

import re

MOVED_MODULES = {
    "detox_lightning.checkpointing": "detox_lightning.io.checkpoint",
    "detox_lightning.builtin": "detox_lightning.offline.builtin",
    "detox_lightning.sample_data": "detox_lightning.offline.sample_data",
    "detox_lightning.ppo_math": "detox_lightning.rl",
    "detox_lightning.estimators": "detox_lightning.rl",
    "detox_lightning.rl.ppo_math": "detox_lightning.rl",
    "detox_lightning.architectures": "detox_lightning.models.architectures",
    "detox_lightning.policy": "detox_lightning.models.policy",
    "detox_lightning.rollout": "detox_lightning.models.rollout",
    "detox_lightning.fast_generation": "detox_lightning.models.fast_generation",
    "detox_lightning.reward_functions": "detox_lightning.rewards.functions",
    "detox_lightning.quantize": "detox_lightning.rewards.quantize",
    "detox_lightning.rows": "detox_lightning.data.rows",
    "detox_lightning.module": "detox_lightning.training.module",
    "detox_lightning.sft": "detox_lightning.training.sft",
    "detox_lightning.settings": "detox_lightning.training.settings",
    "detox_lightning.distributed": "detox_lightning.training.distributed",
    "detox_lightning.guards": "detox_lightning.training.guards",
    "detox_lightning.resumable": "detox_lightning.training.resumable",
    "detox_lightning.metrics": "detox_lightning.evaluation.metrics",
    "detox_lightning.best_adapter": "detox_lightning.evaluation.best_adapter",
    "detox_lightning.pictures": "detox_lightning.evaluation.pictures",
    "detox_lightning.monitor": "detox_lightning.evaluation.monitor",
    "detox_lightning.predict": "detox_lightning.evaluation.predict",
}

_PATH = re.compile(r"detox_lightning(?:\.\w+)+(?::\w+)?")


def new_home(path: str) -> str | None:
    """`path` (`pkg.module.Name` or `pkg.module:name`) rewritten to the current layout, or None
    when it does not start with a module that moved."""
    for old, new in MOVED_MODULES.items():
        if path == old or path.startswith((old + ".", old + ":")):
            return new + path[len(old):]
    return None


def moved_paths_in(text: str) -> list[tuple[str, str]]:
    """Every (old, new) pair for the moved paths that `text` (a YAML file, a command line) names."""
    found = {}
    for match in _PATH.finditer(text):
        new = new_home(match.group(0))
        if new is not None:
            found[match.group(0)] = new
    return sorted(found.items())
