"""`HFClassifierReward(quantize="int8")`: what it changes, how far its scores move, and what it reports."""

import json
import warnings
from pathlib import Path

import pytest
import torch

from detox_lightning.data.datamodule import NOTEBOOK_PROMPT
from detox_lightning.errors import ConfigError
from detox_lightning.rewards.classifiers import HFClassifierReward, ProfanityCheckReward
from detox_lightning.rewards.functions import CombinedReward
from detox_lightning.rewards.quantize import describe_precision, has_int8_linear, rank_correlation

# Bounds on the builtin classifier over the 800 sample texts (measured: max logit change 0.061,
# rank correlation 0.999998 on prompt + summary; 0.0006 and 0.99999 on the summaries alone).
MAX_LOGIT_CHANGE = 0.1
MIN_RANK_CORRELATION = 0.99


def sample_texts(sample_data: str) -> dict[str, list[str]]:
    rows = [
        json.loads(line) for split in ("train", "validation", "test")
        for line in Path(f"{sample_data}/{split}.jsonl").read_text().splitlines()
    ]
    return {
        "query_response": [NOTEBOOK_PROMPT.format(dialogue=r["dialogue"]) + r["summary"] for r in rows],
        "response": [r["summary"] for r in rows],
    }


@pytest.mark.parametrize("text", ["query_response", "response"])
def test_int8_reward_ranks_the_sample_texts_as_float32_does(tiny_classifier, sample_data, text):
    texts = sample_texts(sample_data)[text]
    exact = HFClassifierReward(tiny_classifier)
    int8 = HFClassifierReward(tiny_classifier, quantize="int8")
    a, b = exact.logits(texts), int8.logits(texts)
    assert has_int8_linear(int8.classifier) and not has_int8_linear(exact.classifier)
    assert (a - b).abs().max() <= MAX_LOGIT_CHANGE
    assert (a - b).abs().max() > 0  # it did quantize
    i, t = exact.reward_index, exact.toxic_index
    assert rank_correlation(a[:, i], b[:, i]) >= MIN_RANK_CORRELATION
    assert rank_correlation(a.softmax(-1)[:, t], b.softmax(-1)[:, t]) >= MIN_RANK_CORRELATION
    # the verdict the evaluation counts (toxicity > 0.5) flips for no text, and the mix is real
    toxic = a.softmax(-1)[:, t] > 0.5
    assert torch.equal(toxic, b.softmax(-1)[:, t] > 0.5) and 0 < int(toxic.sum()) < len(texts)


def test_int8_quantizes_the_body_only_and_says_so(tiny_classifier):
    reward = HFClassifierReward(tiny_classifier, quantize="int8")
    assert reward.precision == "int8-dynamic"  # before the first scoring too: on CPU it will be
    assert not has_int8_linear(reward.classifier)  # quantized at the first scoring, not before
    reward.score(["#Person1# is an idiot."])
    assert has_int8_linear(reward.classifier.base_model)
    assert isinstance(reward.classifier.classifier.out_proj, torch.nn.Linear)  # the head stays float32
    assert reward.classifier.classifier.out_proj.weight.dtype == torch.float32
    assert HFClassifierReward(tiny_classifier).precision == "float32"


def test_int8_is_ignored_with_one_warning_off_the_cpu(tiny_classifier):
    reward = HFClassifierReward(tiny_classifier, quantize="int8")
    reward.classifier.to("meta")  # any non-CPU device: int8 dynamic layers run on CPU only
    assert reward.precision == "float32"
    with pytest.warns(UserWarning, match="quantize='int8' runs on CPU only; on meta the classifier scores in float32"):
        reward._prepare(reward._device())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reward._prepare(reward._device())  # once only
    assert not has_int8_linear(reward.classifier)


def test_unknown_quantize_is_named(tiny_classifier):
    with pytest.raises(ConfigError, match="reward quantize='int4' is not one of none, int8"):
        HFClassifierReward(tiny_classifier, quantize="int4")


def test_describe_precision_of_every_kind_of_scorer(tiny_classifier):
    int8 = HFClassifierReward(tiny_classifier, quantize="int8")
    assert describe_precision(int8) == "int8-dynamic"
    assert describe_precision(HFClassifierReward(tiny_classifier)) == "float32"
    assert describe_precision(ProfanityCheckReward()) == "unquantized"
    assert describe_precision(CombinedReward([int8, ProfanityCheckReward()], weights=[1.0, 1.0])) == "int8-dynamic+unquantized"
    assert describe_precision(None) is None


def test_rank_correlation_matches_its_definition():
    assert rank_correlation(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0])) == pytest.approx(1.0)
    assert rank_correlation(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])) == pytest.approx(-1.0)
    # monotone transforms keep the ranks; one swapped pair of 4: 1 - 6 * 2 / (4 * 15) = 0.8
    assert rank_correlation(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 3.0, 2.0, 4.0]).exp()) == pytest.approx(0.8)


@pytest.mark.slow
def test_int8_on_a_random_weight_roberta_base_moves_logits_little_but_ranks_loosely(tmp_path):
    """Why int8 stays opt-in: RoBERTa-base's shape, random weights (the benchmark's reward).

    Its scores of different texts lie within ~0.07 of each other (a random deep encoder maps every
    text to nearly the same vector), and int8 moves each by up to ~0.024, so the rank correlation
    with float32 is 0.68 here (0.84 on another draw), below the 0.99 that would make int8 a
    faithful default. (Quantizing the head too, on the builtin classifier, drops it to 0.66: the
    first test's bound catches that.)
    """
    from detox_lightning.bench.models import build_reward
    from detox_lightning.offline import sample_data as sample

    path = build_reward(tmp_path / "reward", "base")
    rows = sample.make_dialogues(60, seed=7, toxic_fraction=0.5)
    texts = [NOTEBOOK_PROMPT.format(dialogue=r["dialogue"]) + r["summary"] for r in rows][:32]
    exact = HFClassifierReward(path)
    int8 = HFClassifierReward(path, quantize="int8")
    a, b = exact.score(texts), int8.score(texts)
    assert 0 < float((a - b).abs().max()) <= 0.05
    assert float(a.max() - a.min()) < 0.1
    assert rank_correlation(a, b) >= 0.5  # 0.68 measured; int8 kernels may round otherwise on another CPU


@pytest.mark.slow
def test_quick_start_with_the_int8_reward_keeps_its_verdict(tmp_path, quickstart_sft_adapter):
    """The README's quick start (shorter SFT, as tests/test_sft_quickstart.py) with the reward in int8:
    toxicity still falls with a 95% CI wholly below 0, under the reward's classifier and the judge."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    adapter = quickstart_sft_adapter
    run = [sys.executable, "train.py", "fit"]
    detox = subprocess.run(
        run + ["--config", "configs/tiny_detox.yaml", "--trainer.default_root_dir", str(tmp_path / "detox"),
               "--model.init_args.policy.adapter_name_or_path", str(adapter),
               "--model.init_args.reward.init_args.quantize", "int8"],
        cwd=root, capture_output=True, text=True, timeout=2400, check=False,
    )
    assert detox.returncode == 0, detox.stderr[-3000:]
    report = json.loads(next((tmp_path / "detox").rglob("evaluation_report.json")).read_text())
    before, after = report["before"], report["after"]
    assert report["reward_precision"] == "int8-dynamic"  # the report says which arithmetic judged
    assert before["eval/toxicity_mean"] > 0.02
    assert after["eval/toxicity_delta_ci_high"] < 0, after
    assert after["eval/judge_toxicity_delta_ci_high"] < 0, after
