"""Bad input through the real entry point (`python train.py fit` in a subprocess): for each, a
non-zero exit, one `error:` line naming the problem, no traceback, and no new or altered checkpoint."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import yaml
from helpers import write_jsonl

ROOT = Path(__file__).resolve().parents[1]

# (extra arguments, text the error line must contain); {name} is replaced by a file made below.
BAD_INPUTS = {
    "missing data file": (["--data.path", "{tmp}/nowhere/train.jsonl"], "data.path: no such data file"),
    "wrong columns": (["--data.path", "{no_dialogue}"], "has no 'dialogue' column; its columns are ['text']"),
    "empty after filtering": (["--data.path", "{short}"], "0 of 20 dialogues have 200 < characters <= 1000"),
    "min >= max length": (["--data.min_chars", "900", "--data.max_chars", "300"], "data.min_chars=900 must be smaller"),
    "bad reward label": (
        ["--model.init_args.reward.init_args.reward_label", "friendly"],
        "reward_label='friendly' is not a label of builtin:tiny-hate-roberta; its labels are ['hate', 'nothate']",
    ),
    "batch not divisible by mini-batch": (
        ["--data.batch_size", "6"],
        "data.batch_size=6 is not divisible by model.ppo.mini_batch_size=4",
    ),
    "unknown lora target": (
        ["--model.init_args.policy.lora_target_modules", "[q, query]"],
        "policy.lora_target_modules has ['query'], which match no module",
    ),
    "unknown config key": (
        ["--model.init_args.ppo.learnig_rate", "1e-3"],
        "unknown setting --ppo.learnig_rate=1e-3 under 'model'",
    ),
    "negative learning rate": (["--model.init_args.ppo.learning_rate=-1e-3"], "model.ppo.learning_rate=-0.001 must be positive"),
    "zero max_consecutive_skips": (
        ["--model.init_args.ppo.max_consecutive_skips", "0"],
        "model.ppo.max_consecutive_skips=0 must be at least 1",
    ),
    "zero checkpoint frequency": (
        ["--trainer.callbacks.init_args.every_n_iterations", "0"],
        "RLCheckpoint every_n_iterations=0 must be at least 1",
    ),
    "missing checkpoint file": (["--ckpt_path", "{tmp}/gone.ckpt"], "gone.ckpt': no such checkpoint file"),
    "corrupted checkpoint file": (["--ckpt_path", "{corrupted}"], "corrupted.ckpt' is not a readable checkpoint"),
    "checkpoint from another model shape": (
        ["--ckpt_path", "{lora_r4}"],
        "checkpoint does not fit model.policy (model_name_or_path='builtin:tiny-t5', lora_r=8): trainable tensors",
    ),
    # library-raised errors during construction, and out-of-range numbers (issue 12)
    "lora rank of 0": (["--model.init_args.policy.lora_r", "0"], "policy.lora_r=0 must be at least 1"),
    "empty data file": (["--data.path", "{empty}"], "empty.jsonl' is empty; expected rows with a 'dialogue' column"),
    "unreadable data file": (["--data.path", "{broken}"], "broken.jsonl' could not be read as a dataset"),
    "policy path that is no model": (
        ["--model.init_args.policy.model_name_or_path", "{tmp}"],
        "could not be loaded (expected a hub id, a local model directory or a builtin: name)",
    ),
    "adapter path that is no adapter": (
        ["--model.init_args.policy.adapter_name_or_path", "{tmp}"],
        "could not be loaded as a PEFT LoRA adapter of this base model",
    ),
    "top_p above 1": (["--model.init_args.generation.top_p", "1.5"], "model.generation.top_p=1.5 must lie in (0, 1]"),
    "top_k truncation": (["--model.init_args.generation.top_k", "50"], "PPO scores each sampled token under the full"),
    "gamma above 1": (["--model.init_args.ppo.gamma", "1.5"], "model.ppo.gamma=1.5 must lie in [0, 1]"),
    "negative cliprange": (["--model.init_args.ppo.cliprange=-0.2"], "model.ppo.cliprange=-0.2 must be greater than 0"),
    "lora dropout of 1": (["--model.init_args.policy.lora_dropout", "1"], "policy.lora_dropout=1.0 must lie in [0, 1)"),
    "not a number": (["--model.init_args.ppo.learning_rate", "fast"], "ppo.learning_rate='fast' is not a valid float"),
    "reward max_length too small": (
        ["--model.init_args.reward.init_args.max_length", "2"], "reward.max_length=2 must be at least 8"
    ),
    # critic-free estimators (issue 14)
    "rloo with one sample": (
        ["--model.init_args.ppo.advantage_estimator", "rloo"],
        "model.ppo.samples_per_prompt=1 must be at least 2 with advantage_estimator='rloo'",
    ),
    "groups not divisible into mini-batches": (
        ["--model.init_args.ppo.advantage_estimator", "grpo", "--model.init_args.ppo.samples_per_prompt", "3",
         "--model.init_args.ppo.mini_batch_size", "5"],
        "data.batch_size=8 x model.ppo.samples_per_prompt=3 = 24 responses is not divisible by model.ppo.mini_batch_size=5",
    ),
    "unknown estimator": (
        ["--model.init_args.ppo.advantage_estimator", "ppo2"],
        ("model.ppo.advantage_estimator='ppo2' is not one of gae, rloo, grpo, reinforce_plus_plus, "
        "reinforce_plus_plus_baseline"),
    ),
    "output dir not writable": (
        ["--trainer.default_root_dir", "{a_file}/runs"],
        "a_file/runs' cannot be created: ",
    ),
}


@pytest.fixture(scope="module")
def lora_r4_checkpoint(tiny_t5, tiny_classifier, sample_data, tmp_path_factory):
    """A real checkpoint of the tiny T5 with a rank-4 LoRA (the CLI's config uses rank 8)."""
    from detox_lightning import (
        DialogSumDataModule,
        GenerationSettings,
        HFClassifierReward,
        PolicyConfig,
        RLDetoxModule,
        RLSettings,
    )
    from detox_lightning.io.checkpoint import RLCheckpoint

    root = tmp_path_factory.mktemp("lora_r4")
    pl.seed_everything(0)
    module = RLDetoxModule(
        reward=HFClassifierReward(tiny_classifier),
        policy=PolicyConfig(model_name_or_path=tiny_t5, lora_r=4),
        ppo=RLSettings(mini_batch_size=2),
        generation=GenerationSettings(output_min_length=4, output_max_length=4),
        batch_size=2,
    )
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[RLCheckpoint(dirpath=str(root))],
    )
    trainer.fit(module, DialogSumDataModule(path=sample_data, batch_size=2))
    return root / "last.ckpt"


def fingerprint(root: Path) -> dict[str, str]:
    """Every checkpoint (and temp file) under `root`, with a hash of its bytes."""
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file() and (p.suffix == ".ckpt" or p.name.endswith(".tmp"))
    }


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_named_on_stderr_and_leaves_checkpoints_alone(case, tmp_path, lora_r4_checkpoint):
    args, message = BAD_INPUTS[case]
    config = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    config["trainer"]["callbacks"] = [{"class_path": "detox_lightning.io.checkpoint.RLCheckpoint"}]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "corrupted.ckpt").write_bytes(b"PK\x03\x04 this is not a checkpoint" * 100)
    (tmp_path / "a_file").write_text("a file, not a directory")
    r4 = tmp_path / "lora_r4.ckpt"
    r4.write_bytes(lora_r4_checkpoint.read_bytes())
    files = {
        "{tmp}": str(tmp_path),
        "{no_dialogue}": write_jsonl(tmp_path / "a.jsonl", [{"text": "x" * 300}] * 20),
        "{short}": write_jsonl(tmp_path / "b.jsonl", [{"dialogue": "hi"}] * 20),
        "{corrupted}": str(tmp_path / "corrupted.ckpt"),
        "{lora_r4}": str(r4),
        "{a_file}": str(tmp_path / "a_file"),
        "{empty}": write_jsonl(tmp_path / "empty.jsonl", []),
        "{broken}": str(tmp_path / "broken.jsonl"),
    }
    (tmp_path / "broken.jsonl").write_text('{"dialogue": "never closed"\n')
    for key, value in files.items():
        args = [a.replace(key, value) for a in args]
    before = fingerprint(tmp_path)
    assert str(r4) in before

    result = subprocess.run(
        [sys.executable, "train.py", "fit", "--config", str(tmp_path / "config.yaml"),
         "--trainer.default_root_dir", str(tmp_path / "runs"), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=os.environ.copy(), check=False,
    )

    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == errors[0]
    assert fingerprint(tmp_path) == before  # nothing new, nothing altered, no leftover temp file
