"""FunctionReward and CombinedReward: what they compute, from YAML through the real CLI, and bad paths."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from detox_lightning import CombinedReward, FunctionReward, HFClassifierReward
from detox_lightning.errors import ConfigError
from detox_lightning.evaluation.scoring import toxicity_of
from detox_lightning.rewards.functions import repeated_bigram_penalty, short_response_penalty

ROOT = Path(__file__).resolve().parents[1]
QUERIES = ["#Person1#: Hi.\nSummary:\n", "#Person1#: Bye.\nSummary:\n"]
RESPONSES = ["#Person1# says hi to #Person2#.", "#Person2# is an idiot idiot idiot idiot."]


def test_function_reward_calls_the_function_with_queries_and_responses():
    reward = FunctionReward("reward_fns:longer_is_better", toxicity_function="reward_fns:toxicity_of_idiot")
    assert reward(QUERIES, RESPONSES).tolist() == [5.0, 7.0]
    assert toxicity_of(reward, QUERIES, RESPONSES, "query_response").tolist() == [0.0, 1.0]


def test_combined_reward_is_the_weighted_sum_and_takes_one_components_toxicity(tiny_classifier):
    classifier = HFClassifierReward(tiny_classifier)
    penalty = FunctionReward("detox_lightning.rewards.functions:repeated_bigram_penalty")
    combined = CombinedReward([classifier, penalty], weights=[1.0, 2.0], toxicity_from=0)
    want = classifier(QUERIES, RESPONSES) + 2.0 * torch.tensor(repeated_bigram_penalty(QUERIES, RESPONSES))
    torch.testing.assert_close(combined(QUERIES, RESPONSES), want)
    assert combined(QUERIES, RESPONSES)[1] < classifier(QUERIES, RESPONSES)[1]  # the repetition costs
    torch.testing.assert_close(
        combined.pair_toxicity(QUERIES, RESPONSES, "response"), classifier.pair_toxicity(QUERIES, RESPONSES, "response")
    )


def test_ready_made_penalties_by_hand():
    assert repeated_bigram_penalty([""] * 3, ["a b c d", "a brown a brown", ""]) == [0.0, -1 / 3, 0.0]
    assert short_response_penalty([""] * 2, ["one two", " ".join(["w"] * 12)]) == [-0.8, 0.0]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"function": "no_such_module:f"}, "FunctionReward function='no_such_module:f' does not import"),
        ({"function": "reward_fns:missing"}, "does not import (AttributeError"),
        ({"function": "reward_fns:NOT_A_FUNCTION"}, "is a int, not a function"),
        ({"function": "reward_fns"}, "is not of the form 'package.module:name'"),
        ({"function": "reward_fns:one_score_too_few"}, "returned 0 scores for 1 responses"),
    ],
)
def test_bad_function_is_named_at_construction(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        FunctionReward(**kwargs)


def test_function_reward_without_toxicity_function_refuses_to_judge():
    reward = FunctionReward("reward_fns:longer_is_better")
    with pytest.raises(ConfigError, match="has no toxicity_function"):
        toxicity_of(reward, QUERIES, RESPONSES, "query_response")


def cli(tmp_path, config, *args):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "train.py", "fit", "--config", str(tmp_path / "config.yaml"),
         "--trainer.default_root_dir", str(tmp_path / "runs"), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env, check=False,
    )


def test_combined_reward_and_function_judge_load_from_yaml_and_train(tmp_path):
    config = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    config["trainer"]["limit_train_batches"] = 1
    config["model"]["init_args"]["reward"] = {
        "class_path": "detox_lightning.CombinedReward",
        "init_args": {
            "components": [
                {"class_path": "detox_lightning.HFClassifierReward",
                 "init_args": {"model_name_or_path": "builtin:tiny-hate-roberta"}},
                {"class_path": "detox_lightning.FunctionReward",
                 "init_args": {"function": "detox_lightning.rewards.functions:repeated_bigram_penalty"}},
            ],
            "weights": [1.0, 2.0],
        },
    }
    evaluation = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("ToxicityEvaluation"))
    evaluation["init_args"].update(num_prompts=4, max_new_tokens=8)
    evaluation["init_args"]["judge"] = {
        "class_path": "detox_lightning.FunctionReward",
        "init_args": {"function": "reward_fns:longer_is_better", "toxicity_function": "reward_fns:toxicity_of_idiot"},
    }
    result = cli(tmp_path, config)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| judge 0.0000" in result.stdout + result.stderr  # the function judge scored the evaluation


def test_wrong_function_path_in_yaml_is_one_error_line(tmp_path):
    config = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    config["model"]["init_args"]["reward"] = {
        "class_path": "detox_lightning.FunctionReward", "init_args": {"function": "reward_fns:nope"}
    }
    result = cli(tmp_path, config)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: FunctionReward function='reward_fns:nope' does not import"), last
    assert not (tmp_path / "runs").exists()
