"""adapter_best/: the choice among evaluations on synthetic results, and what the evaluation exports."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch.trainer.states import TrainerFn

from detox_lightning import HFClassifierReward, PolicyConfig, RLDetoxModule
from detox_lightning.evaluation.best_adapter import Candidate, select_best
from detox_lightning.evaluation.toxicity import Outputs, ToxicityEvaluation


def result(iteration, toxicity, ci_high, rouge_delta=-0.01, judge_delta=-0.05):
    metrics = {
        "eval/toxicity_mean": toxicity,
        "eval/toxicity_delta": ci_high - 0.05,
        "eval/toxicity_delta_ci_low": ci_high - 0.1,
        "eval/toxicity_delta_ci_high": ci_high,
        "eval/rougeL": 0.2 + rouge_delta,
        "eval/rougeL_delta": rouge_delta,
    }
    if judge_delta is not None:
        metrics |= {"eval/judge_toxicity_mean": 0.1, "eval/judge_toxicity_delta": judge_delta}
    return Candidate(iteration, metrics)


SYNTHETIC = [
    result(2, toxicity=0.30, ci_high=-0.01),  # qualifies, but not the lowest
    result(4, toxicity=0.25, ci_high=0.002),  # the CI reaches 0
    result(6, toxicity=0.20, ci_high=-0.05),  # the best qualified one
    result(8, toxicity=0.10, ci_high=-0.20, rouge_delta=-0.03),  # lowest toxicity, but ROUGE-L fell 0.03
    result(10, toxicity=0.15, ci_high=-0.10, judge_delta=0.01),  # the judge saw it get worse
    result(12, toxicity=0.20, ci_high=-0.05),  # ties with 6: the earlier one wins
]


def test_selection_picks_the_lowest_qualified_toxicity_and_names_each_rejection():
    selection = select_best(SYNTHETIC, max_rouge_drop=0.02, judge="judge")
    assert selection.chosen.iteration == 6
    assert selection.rejected == {
        2: "toxicity 0.3000 is not below iteration 6's 0.2000",
        4: "toxicity CI upper bound +0.0020 is not below 0",
        8: "ROUGE-L fell by 0.0300 > max_rouge_drop 0.02",
        10: "judge toxicity delta +0.0100 is above 0",
        12: "toxicity 0.2000 is not below iteration 6's 0.2000",
    }
    report = selection.as_dict()
    assert report["iteration"] == 6 and report["figures"]["eval/toxicity_mean"] == 0.2
    assert set(report["rejected"]) == {"2", "4", "8", "10", "12"}
    lines = selection.lines()
    assert lines[0].startswith("best adapter: iteration 6 of 6 evaluated (toxicity 0.2000, delta -0.1000 [95% CI -0.1500, -0.0500]")
    assert lines[3] == "  iteration 8 rejected: ROUGE-L fell by 0.0300 > max_rouge_drop 0.02"


def test_selection_settings_change_the_choice():
    assert select_best(SYNTHETIC, max_rouge_drop=0.05, judge="judge").chosen.iteration == 8  # a looser ROUGE guard
    assert select_best(SYNTHETIC, max_rouge_drop=0.02, judge=None).chosen.iteration == 10  # no judge to veto it
    two = [result(2, 0.3, -0.01, judge_delta=None)]
    assert select_best(two, 0.02, judge="judge").rejected == {2: "no judge toxicity"}


def test_no_qualified_candidate_chooses_none_and_says_so():
    selection = select_best([result(3, 0.05, 0.0), result(6, 0.04, -0.1, rouge_delta=-0.5)], 0.02, judge="judge")
    assert selection.chosen is None and set(selection.rejected) == {3, 6}
    assert selection.lines()[0] == "best adapter: none of 2 evaluations qualifies; adapter_best/ not written"
    assert selection.as_dict()["iteration"] is None


# ---- what the evaluation exports, candidate by candidate ----


def lora_b(model) -> dict[str, torch.Tensor]:
    return {n.replace(".policy.", ".").replace(".default.", "."): p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}


def test_adapter_best_holds_the_weights_of_the_chosen_evaluation(tiny_t5, tiny_classifier, tmp_path):
    """Four evaluations of four different policies (synthetic figures): adapter_best/ is written when
    an evaluation becomes the best so far and then holds that policy's weights, not the last one's."""
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    module = RLDetoxModule(
        reward=HFClassifierReward(tiny_classifier), policy=PolicyConfig(model_name_or_path=tiny_t5, lora_r=4), batch_size=4
    )
    evaluation = ToxicityEvaluation(plots=False, judge=None)
    before = Outputs(["q"] * 2, [["a"], ["b"]], np.full((2, 1), 0.5), np.zeros((2, 1)), np.ones((2, 1)), None, None)
    evaluation.before, evaluation.before_metrics = before, {"eval/toxicity_mean": 0.5, "eval/rougeL": 0.2}
    trainer = SimpleNamespace(
        log_dir=str(tmp_path), default_root_dir=str(tmp_path), is_global_zero=True, loggers=[],
        state=SimpleNamespace(fn=TrainerFn.FITTING),
    )
    weights = {}
    for step, toxicity, ci_high in [(1, 0.30, -0.1), (2, 0.20, -0.1), (3, 0.25, -0.1), (4, 0.05, 0.01)]:
        with torch.no_grad():
            for name, param in module.policy.named_parameters():
                if "lora_B.policy" in name:
                    param.fill_(float(step))
        weights[step] = lora_b(module.policy.pretrained_model)
        metrics = result(step, toxicity, ci_high, judge_delta=None).metrics
        evaluation.last_metrics = metrics
        evaluation.keep_candidate(trainer, module, step, step, f"iteration {step}", before, metrics)
        exported = lora_b(PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(tiny_t5), tmp_path / "adapter_best"))
        best_so_far = min((s for s in weights if s != 4), key=lambda s: {1: 0.30, 2: 0.20, 3: 0.25}[s])
        assert all(torch.equal(exported[n], weights[best_so_far][n]) for n in exported), step
    assert "best of this run's evaluations (iteration 2)" in (tmp_path / "adapter_best" / "README.md").read_text()
    assert evaluation.selection().lines()[0].startswith("best adapter: iteration 2 of 4 evaluated")
    assert evaluation.selection().rejected[4] == "toxicity CI upper bound +0.0100 is not below 0"


@pytest.mark.parametrize("value", [-0.01, float("nan"), "much"])
def test_max_rouge_drop_must_be_a_number_of_at_least_0(value):
    from detox_lightning.errors import ConfigError

    with pytest.raises(ConfigError, match="max_rouge_drop=.* must be a number of at least 0"):
        ToxicityEvaluation(max_rouge_drop=value)


@pytest.mark.parametrize("figure", ["eval/rougeL_delta", "eval/judge_toxicity_delta", "eval/toxicity_mean", "eval/rougeL"])
@pytest.mark.parametrize("value", [float("nan"), float("-nan"), float("inf"), float("-inf")])
def test_a_non_finite_figure_never_qualifies(figure, value):
    candidate = result(6, toxicity=0.20, ci_high=-0.05)
    broken = Candidate(6, candidate.metrics | {figure: value})
    selection = select_best([broken], max_rouge_drop=0.02, judge="judge")
    assert selection.chosen is None
    assert f"non-finite {figure}=" in selection.rejected[6]
    # the same candidate with finite figures qualifies: the rule, not the data, rejects it
    assert select_best([candidate], max_rouge_drop=0.02, judge="judge").chosen == candidate
