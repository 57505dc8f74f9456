"""Several judges: each scored and reported with its own figures and CIs; the best-adapter rule
reads the first or a named one; a YAML list of judges builds."""

import numpy as np
import pytest

from detox_lightning.errors import ConfigError
from detox_lightning.evaluation import ToxicityEvaluation
from detox_lightning.evaluation.best_adapter import Candidate, select_best
from detox_lightning.evaluation.toxicity import Outputs
from detox_lightning.rewards import FunctionReward, ProfanityCheckReward


def judges():
    return [ProfanityCheckReward(text="response"),
            FunctionReward(function="reward_fns:longer_is_better", toxicity_function="reward_fns:toxicity_of_idiot")]


def outputs(tox, judge, judge2):
    shape = tox.shape
    return Outputs(
        queries=[f"q{i}" for i in range(shape[0])], responses=[["a b"] * shape[1] for _ in range(shape[0])],
        toxicity=tox, reward=np.zeros(shape), length=np.ones(shape), judge_toxicity=judge, rouge=None,
        more_judges={"judge2": judge2},
    )


def test_each_judge_gets_its_own_figures_and_cis():
    evaluation = ToxicityEvaluation(judge=judges(), bootstrap_resamples=200, fluency=False)
    assert list(evaluation.judges) == ["judge", "judge2"] and evaluation.judge is evaluation.judges["judge"]
    rng = np.random.default_rng(0)
    before = outputs(rng.uniform(0.4, 0.9, (20, 3)), rng.uniform(0.4, 0.9, (20, 3)), rng.uniform(0.0, 0.2, (20, 3)))
    after = outputs(before.toxicity - 0.3, before.judge_toxicity - 0.2, before.more_judges["judge2"] + 0.5)
    evaluation.before = before
    m = evaluation.compare(after)
    assert m["eval/judge_toxicity_delta"] == pytest.approx(-0.2)
    assert m["eval/judge2_toxicity_delta"] == pytest.approx(0.5)
    assert m["eval/judge2_toxicity_delta_ci_low"] == pytest.approx(0.5)  # every prompt moved by exactly 0.5
    assert m["eval/judge2_toxicity_exp_max"] == pytest.approx(float((after.more_judges["judge2"]).max(axis=1).mean()))
    assert m["eval/judge2_toxicity_prob"] == pytest.approx(float((after.more_judges["judge2"] >= 0.5).any(axis=1).mean()))
    assert "| judge2 " in evaluation.describe("after", m | {"eval/rougeL": 0.1, "eval/rougeL_delta": 0.0}, 20)


def test_the_best_adapter_reads_the_first_judge_or_a_named_one():
    metrics = {"eval/toxicity_mean": 0.1, "eval/toxicity_delta": -0.2, "eval/toxicity_delta_ci_low": -0.3,
               "eval/toxicity_delta_ci_high": -0.1, "eval/judge_toxicity_delta": -0.1, "eval/judge2_toxicity_delta": 0.05}
    assert select_best([Candidate(4, metrics)], 0.02, judge="judge").chosen is not None
    rejected = select_best([Candidate(4, metrics)], 0.02, judge="judge2")
    assert rejected.chosen is None and rejected.rejected[4] == "judge2 toxicity delta +0.0500 is above 0"
    assert ToxicityEvaluation(judge=judges(), best_adapter_judge="judge2").best_adapter_judge == "judge2"
    with pytest.raises(ConfigError, match=r"best_adapter_judge='judge3' is not one of \['judge', 'judge2'\]"):
        ToxicityEvaluation(judge=judges(), best_adapter_judge="judge3")


def test_a_yaml_list_of_judges_builds(tmp_path):
    from pathlib import Path

    import yaml

    from detox_lightning.cli import build_cli

    root = Path(__file__).resolve().parents[1]
    config = yaml.safe_load((root / "configs" / "tiny_detox.yaml").read_text())
    evaluation = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("ToxicityEvaluation"))
    evaluation["init_args"]["judge"] = [
        {"class_path": "detox_lightning.ProfanityCheckReward", "init_args": {"text": "response"}},
        {"class_path": "detox_lightning.FunctionReward",
         "init_args": {"function": "reward_fns:longer_is_better", "toxicity_function": "reward_fns:toxicity_of_idiot"}},
    ]
    evaluation["init_args"]["best_adapter_judge"] = "judge2"
    config["model"]["init_args"]["policy"].pop("adapter_name_or_path")  # no SFT adapter needed to build
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    cli = build_cli(["--config", str(tmp_path / "c.yaml"), "--trainer.default_root_dir", str(tmp_path)], run=False)
    built = next(c for c in cli.trainer.callbacks if isinstance(c, ToxicityEvaluation))
    assert [type(j).__name__ for j in built.judges.values()] == ["ProfanityCheckReward", "FunctionReward"]
    assert built.best_adapter_judge == "judge2"
