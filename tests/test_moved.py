"""Old names still work or say where they went: the PPO-era class names are aliases, the classes
users name in YAML resolve from their subpackage, and a module path of the old flat layout ends in
one `error:` line that names its new home."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from detox_lightning.errors import ConfigError
from detox_lightning.moved import MOVED_MODULES, moved_paths_in, new_home

ROOT = Path(__file__).resolve().parents[1]


def import_path(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("detox_lightning.PPODetoxModule", "detox_lightning.training.module.RLDetoxModule"),
        ("detox_lightning.PPOSettings", "detox_lightning.training.settings.RLSettings"),
        ("detox_lightning.io.PPOCheckpoint", "detox_lightning.io.checkpoint.RLCheckpoint"),
        ("detox_lightning.evaluation.ToxicityEvaluation", "detox_lightning.evaluation.toxicity.ToxicityEvaluation"),
        ("detox_lightning.rewards.HFClassifierReward", "detox_lightning.rewards.classifiers.HFClassifierReward"),
        ("detox_lightning.data.DialogSumDataModule", "detox_lightning.data.datamodule.DialogSumDataModule"),
    ],
)
def test_names_users_write_in_yaml_still_resolve(old, new):
    assert import_path(old) is import_path(new)


@pytest.mark.parametrize("old", sorted(MOVED_MODULES))
def test_every_moved_module_is_gone_and_its_new_home_imports(old):
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(old)
    importlib.import_module(MOVED_MODULES[old])


def test_new_home_rewrites_module_and_function_paths():
    assert new_home("detox_lightning.checkpointing.PPOCheckpoint") == "detox_lightning.io.checkpoint.PPOCheckpoint"
    assert new_home("detox_lightning.reward_functions:repeated_bigram_penalty") == (
        "detox_lightning.rewards.functions:repeated_bigram_penalty"
    )
    assert new_home("detox_lightning.monitoring.X") is None  # a prefix is not a module
    assert new_home("detox_lightning.evaluation.ToxicityEvaluation") is None  # still resolves
    text = "- class_path: detox_lightning.monitor.RolloutMonitor\n  class_path: detox_lightning.HFClassifierReward"
    assert moved_paths_in(text) == [("detox_lightning.monitor.RolloutMonitor", "detox_lightning.evaluation.monitor.RolloutMonitor")]


def test_a_reward_function_at_its_old_path_names_the_new_one():
    from detox_lightning.rewards import FunctionReward

    with pytest.raises(ConfigError, match="has moved; use 'detox_lightning.rewards.functions:repeated_bigram_penalty'"):
        FunctionReward(function="detox_lightning.reward_functions:repeated_bigram_penalty")


def test_an_old_class_path_in_a_config_file_is_one_error_line(tmp_path):
    config = tmp_path / "old.yaml"
    old = (ROOT / "configs" / "tiny.yaml").read_text().replace(
        "detox_lightning.io.RLCheckpoint", "detox_lightning.checkpointing.PPOCheckpoint"
    )
    assert "detox_lightning.checkpointing.PPOCheckpoint" in old
    config.write_text(old)
    out = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / "run")],
        capture_output=True, text=True, cwd=ROOT, timeout=300, check=False,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines[-1] == "error: detox_lightning.checkpointing.PPOCheckpoint has moved: use detox_lightning.io.checkpoint.PPOCheckpoint"
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()
