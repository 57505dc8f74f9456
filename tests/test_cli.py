"""The real command line: shipped configs parse, the tiny run writes its logs, bad input is named."""

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_jsonl

from detox_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
REQUIRED_TAGS = [
    "objective/kl",
    "objective/kl_coef",
    "objective/entropy",
    "ppo/returns/mean",
    "ppo/policy/advantages_mean",
    "ppo/loss/policy",
    "ppo/loss/value",
    "ppo/policy/clipfrac",
    "ppo/policy/approxkl",
    "ppo/val/vpred",
    "env/reward_mean",
    "env/reward_std",
    "tokens/responses_len_mean",
    "time/rollout",
    "time/update",
]


def run_train(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "train.py", *args], cwd=cwd, capture_output=True, text=True, timeout=600, check=False
    )


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_parses(config):
    result = run_train("fit", "--config", str(config), "--print_config")
    assert result.returncode == 0, result.stderr
    assert "class_path: detox_lightning." in result.stdout


@pytest.mark.parametrize(("accelerator", "expected"), [("cpu", "float32"), ("CPU", "float32"), ("auto", "auto"),
                                                      ("gpu", "auto")])
def test_auto_dtype_is_float32_when_the_trainer_runs_on_the_cpu(accelerator, expected):
    """Where a GPU is visible but the trainer is told `accelerator: cpu` (the tiny configs), `auto`
    must not load bf16 weights to run them on the CPU; other accelerators leave `auto` to the policy."""
    from jsonargparse import Namespace

    from detox_lightning.cli import resolve_auto_dtype

    config = Namespace(trainer=Namespace(accelerator=accelerator),
                       model=Namespace(init_args=Namespace(policy=Namespace(dtype="auto"))))
    resolve_auto_dtype(config)
    assert config.model.init_args.policy.dtype == expected
    explicit = Namespace(trainer=Namespace(accelerator="cpu"),
                         model=Namespace(init_args=Namespace(policy=Namespace(dtype="bfloat16"))))
    resolve_auto_dtype(explicit)
    assert explicit.model.init_args.policy.dtype == "bfloat16"  # an explicit choice stays


def test_tiny_fit_writes_tensorboard_metrics_and_a_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run_train("fit", "--config", "configs/tiny.yaml", "--trainer.default_root_dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "lightning_logs" / "version_0"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    events = EventAccumulator(str(next(run_dir.glob("events.out.tfevents.*"))))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert set(REQUIRED_TAGS) <= tags, set(REQUIRED_TAGS) - tags
    assert len(events.Scalars("objective/kl")) == 3  # one point per PPO iteration
    assert abs(events.Scalars("objective/kl")[0].value) < 1e-4
    output = result.stdout + result.stderr
    assert "eval after 3 iterations" in output
    for noise in LIBRARY_NOISE:
        assert noise not in output, noise


# Library output that says nothing actionable about a run (see cli.quiet_library_noise).
LIBRARY_NOISE = ("Loading weights", "Map:", "NOT tie them", "`tie_word_embeddings=True`", "in eval mode at the start",
                 "💡 Tip", "is_gradient_checkpointing", "LeafSpec", "no `validation_step`")


BAD_INPUTS = {
    "missing data file": (["--data.path", "/nonexistent/train.jsonl"], "no such data file"),
    "no dialogue column": (["--data.path", "{no_dialogue}"], "no 'dialogue' column"),
    "empty after filtering": (["--data.path", "{short}"], "0 of 20 dialogues have 200 < characters <= 1000"),
    "min >= max chars": (["--data.min_chars", "900", "--data.max_chars", "300"], "data.min_chars=900 must be smaller"),
    "bad reward label": (
        ["--model.init_args.reward.init_args.reward_label", "friendly"],
        "reward_label='friendly' is not a label of builtin:tiny-hate-roberta; its labels are ['hate', 'nothate']",
    ),
    "batch not divisible": (["--data.batch_size", "6"], "data.batch_size=6 is not divisible by model.ppo.mini_batch_size=4"),
    "unknown lora target": (
        ["--model.init_args.policy.lora_target_modules", "[q, query]"],
        "policy.lora_target_modules has ['query']",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_stops_with_one_named_error_and_writes_nothing(case, tmp_path, capsys):
    args, message = BAD_INPUTS[case]
    files = {
        "{no_dialogue}": write_jsonl(tmp_path / "a.jsonl", [{"text": "x" * 300}] * 20),
        "{short}": write_jsonl(tmp_path / "b.jsonl", [{"dialogue": "hi"}] * 20),
    }
    args = [files.get(a, a) for a in args]
    root = tmp_path / "runs"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), "--trainer.default_root_dir", str(root), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err[-3:]
    assert not root.exists() or not any(root.rglob("*")), list(root.rglob("*"))


def test_bad_input_through_the_real_entry_point_has_no_traceback(tmp_path):
    result = run_train("fit", "--config", "configs/tiny.yaml", "--data.min_chars", "900", "--data.max_chars", "300",
                       "--trainer.default_root_dir", str(tmp_path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: data.min_chars=900")
