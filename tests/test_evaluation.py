"""Evaluation: bootstrap CI, the toxicity number, and what a fit run writes (table, report, adapter)."""

import csv
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from detox_lightning import DialogSumDataModule, GenerationSettings, HFClassifierReward, PolicyConfig, RLDetoxModule
from detox_lightning.evaluation.metrics import Rouge, improvement_pct, paired_bootstrap_ci, summarize
from detox_lightning.evaluation.scoring import toxicity_of
from detox_lightning.evaluation.toxicity import TABLE_COLUMNS, ToxicityEvaluation, markdown_table
from detox_lightning.rewards.classifiers import ProfanityCheckReward, RewardModel
from detox_lightning.rewards.measurement import Toxicity
from detox_lightning.training.settings import RLSettings

ROOT = Path(__file__).resolve().parents[1]


def test_bootstrap_of_identical_pairs_is_zero_width_at_zero():
    x = np.random.default_rng(0).random(50)
    assert paired_bootstrap_ci(x, x.copy()) == (0.0, 0.0, 0.0)


def test_bootstrap_of_a_constant_shift_is_that_shift():
    x = np.random.default_rng(1).random(50)
    mean, low, high = paired_bootstrap_ci(x, x - 0.25)
    assert mean == pytest.approx(-0.25) and low == pytest.approx(-0.25) and high == pytest.approx(-0.25)


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_more_pairs():
    rng = np.random.default_rng(2)
    widths = []
    for n in (20, 2000):
        before = rng.random(n)
        after = before - 0.1 + rng.normal(0, 0.2, n)
        mean, low, high = paired_bootstrap_ci(before, after, resamples=2000)
        assert low < mean < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 5


def test_summary_and_notebook_improvement():
    assert summarize(np.array([0.2, 0.4, 0.9])) == pytest.approx({"mean": 0.5, "std": np.std([0.2, 0.4, 0.9]), "frac_above_0.5": 1 / 3})
    assert improvement_pct(0.2, 0.15) == pytest.approx(25.0)


def test_evaluation_line_says_n_a_for_an_improvement_of_a_zero_baseline():
    from detox_lightning.evaluation.toxicity import ToxicityEvaluation

    metrics = {
        "eval/toxicity_mean": 0.05, "eval/toxicity_std": 0.0, "eval/toxicity_delta": 0.0,
        "eval/toxicity_delta_ci_low": 0.0, "eval/toxicity_delta_ci_high": 0.0,
        "eval/toxicity_mean_improvement_pct": 0.0, "eval/toxicity_std_improvement_pct": float("nan"),
        "eval/toxicity_frac_above_0.5": 0.0, "eval/response_len_mean": 30.0,
    }
    line = ToxicityEvaluation().describe("after 3 iterations", metrics, 32)
    assert "improvement 0.0% mean / n/a std" in line and "nan" not in line


def test_toxicity_measurement_is_the_classifiers_softmax_probability_of_hate(tiny_classifier):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = ["You are a stupid idiot.", "#Person1# thanks #Person2# for the lovely dinner."]
    reward = HFClassifierReward(tiny_classifier)
    got = Toxicity(reward.toxicity, keep_in_memory=True).compute(predictions=texts)["toxicity"]
    tok = AutoTokenizer.from_pretrained(tiny_classifier)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier).eval()
    with torch.no_grad():
        probs = model(**tok(texts, padding=True, return_tensors="pt")).logits.softmax(-1)
    np.testing.assert_allclose(got, probs[:, model.config.label2id["hate"]].numpy(), rtol=1e-5)


def test_toxicity_of_a_long_query_still_sees_the_response(tiny_classifier):
    long_query = "#Person1#: We talked about the weather and the trains. " * 200 + "Summary:\n"  # 2,000 words
    responses = ["#Person1# says #Person2# is a stupid idiot.", "#Person1# and #Person2# talk about the trains."]
    toxicity = toxicity_of(HFClassifierReward(tiny_classifier), [long_query] * 2, responses, "query_response")
    # Cut from the right, both texts would be the same first 512 tokens of the dialogue.
    assert toxicity[0] > toxicity[1] + 0.05


def test_rouge_measurement_matches_rouge_score():
    from rouge_score import rouge_scorer

    scores = Rouge(keep_in_memory=True).compute(predictions=["the cat sat"], references=["the cat sat on the mat"])
    expected = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score("the cat sat on the mat", "the cat sat")
    assert scores["rougeL"][0] == pytest.approx(expected["rougeL"].fmeasure)


def test_markdown_table_escapes_pipes_and_newlines():
    row = dict(zip(TABLE_COLUMNS, ["a|b\nc", "x", "y", 1.0, 2.0, 1.0]))
    assert "a\\|b c" in markdown_table([row])


@pytest.fixture(scope="module")
def fitted(tiny_t5, tiny_classifier, sample_data, tmp_path_factory):
    """A 2-iteration fit with evaluation every iteration and a held-out judge."""
    pl.seed_everything(0)
    root = tmp_path_factory.mktemp("fit")
    module = RLDetoxModule(
        reward=HFClassifierReward(tiny_classifier),
        policy=PolicyConfig(model_name_or_path=tiny_t5, lora_r=4),
        ppo=RLSettings(learning_rate=1e-2, mini_batch_size=4),
        generation=GenerationSettings(output_min_length=8, output_max_length=12),
        batch_size=4,
    )
    evaluation = ToxicityEvaluation(
        num_prompts=12, every_n_iterations=1, max_new_tokens=12, judge=ProfanityCheckReward(), table_rows=5, batch_size=8
    )
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=2, default_root_dir=root, callbacks=[evaluation],
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
    )
    trainer.fit(module, DialogSumDataModule(path=sample_data, batch_size=4))
    return trainer, module, evaluation, Path(trainer.log_dir)


def test_fit_writes_table_report_and_tensorboard_scalars(fitted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, evaluation, log_dir = fitted
    with (log_dir / "toxicity_table.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and list(rows[0]) == TABLE_COLUMNS
    diffs = [float(r["reward_diff"]) for r in rows]
    assert diffs == sorted(diffs, reverse=True)
    for r in rows:
        assert float(r["reward_diff"]) == pytest.approx(float(r["reward_after"]) - float(r["reward_before"]), abs=1e-6)

    report = json.loads((log_dir / "evaluation_report.json").read_text())
    assert report["num_prompts"] == 12 and report["iteration"] == 2
    after = report["after"]
    for key in ("eval/toxicity_mean", "eval/toxicity_delta_ci_low", "eval/judge_toxicity_delta", "eval/rougeL", "eval/response_len_mean"):
        assert key in after and np.isfinite(after[key])
    assert after["eval/toxicity_delta_ci_low"] <= after["eval/toxicity_delta"] <= after["eval/toxicity_delta_ci_high"]
    # Each delta is after - before over the same prompts: the report's two means, and the table's
    # rows against the two evaluations' per-prompt figures, looked up by query.
    before, final = evaluation.before, evaluation.last_outputs
    for name in ("toxicity", "judge_toxicity"):
        delta = after[f"eval/{name}_delta"]
        assert delta == pytest.approx(after[f"eval/{name}_mean"] - report["before"][f"eval/{name}_mean"], abs=1e-9)
    assert after["eval/judge_toxicity_delta"] != 0.0  # else the check above could not tell after from before
    assert final.queries == before.queries
    index = {q: i for i, q in enumerate(before.queries)}
    for r in rows:
        i = index[r["query"]]
        assert (r["response_before"], r["response_after"]) == (before.responses[i][0], final.responses[i][0])
        assert float(r["reward_before"]) == pytest.approx(float(before.reward[i, 0]), abs=1e-6)
        assert float(r["reward_after"]) == pytest.approx(float(final.reward[i, 0]), abs=1e-6)
    assert set(report["versions"]) >= {"torch", "transformers", "peft", "trl", "lightning"}
    assert (report["reward_precision"], report["judge_precision"]) == ("float32", "unquantized")
    assert report["policy_dtype"] == "float32"  # what the base weights ran in, whatever policy.dtype said

    events = EventAccumulator(str(next(log_dir.glob("events.out.tfevents.*"))))
    events.Reload()
    steps = [e.step for e in events.Scalars("eval/toxicity_mean")]
    assert steps == [0, 1, 2]  # before, then every iteration; the last one's is also the final evaluation
    assert "eval/before_after/text_summary" in events.Tags()["tensors"]


def test_exported_adapter_reloads_with_peft_equals_the_trained_one_and_generates(fitted, tiny_t5):
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    _, module, _, log_dir = fitted
    adapter_dir = log_dir / "adapter"
    assert (adapter_dir / "adapter_model.safetensors").is_file() and (adapter_dir / "README.md").is_file()
    loaded = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(tiny_t5), adapter_dir).eval()
    trained = {
        n.replace(".policy.", ".default."): p
        for n, p in module.policy.pretrained_model.named_parameters()
        if "lora_" in n and ".policy." in n
    }
    got = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert got.keys() == trained.keys()
    for name, param in got.items():
        assert torch.equal(param, trained[name]), name
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    ids = tokenizer(["#Person1#: Hi.\n#Person2#: Hello."], return_tensors="pt")
    out = loaded.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > 1


def test_evaluation_set_larger_than_test_split_is_capped_with_a_warning(fitted):
    trainer, _, _, _ = fitted
    evaluation = ToxicityEvaluation(num_prompts=10_000, max_new_tokens=4, batch_size=64)
    with pytest.warns(UserWarning, match="num_prompts=10000 exceeds the"):
        batches = evaluation.prompt_batches(trainer, torch.device("cpu"))
    assert sum(len(b["query"]) for b in batches) == len(trainer.datamodule.test_dataset)


def test_missing_summary_column_skips_rouge_with_a_warning(fitted, tmp_path):
    trainer, module, _, _ = fitted
    rows = [{"dialogue": "#Person1#: " + "hello there " * 30} for _ in range(10)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = DialogSumDataModule(path=str(path), batch_size=2, tokenizer_name_or_path=module.tokenizer.name_or_path)
    data.setup("test")
    evaluation = ToxicityEvaluation(num_prompts=2, max_new_tokens=4)
    trainer.datamodule.test_dataset, saved = data.test_dataset, trainer.datamodule.test_dataset
    try:
        with pytest.warns(UserWarning, match="no 'summary' column; ROUGE is skipped"):
            outputs = evaluation.generate_and_score(trainer, module, reference=True)
    finally:
        trainer.datamodule.test_dataset = saved
    assert outputs.rouge is None and outputs.toxicity.shape == (2, 1)


def untrained_module(tiny_t5, reward, adapter=None):
    return RLDetoxModule(
        reward=reward,
        policy=PolicyConfig(model_name_or_path=tiny_t5, adapter_name_or_path=adapter, lora_r=4),
        ppo=RLSettings(mini_batch_size=4),
        generation=GenerationSettings(output_min_length=8, output_max_length=12),
        batch_size=4,
    )


def no_fit(sample_data, tiny_t5):
    """What `generate_and_score` reads of a trainer, without a fit: the data and one rank."""
    data = DialogSumDataModule(path=sample_data, tokenizer_name_or_path=tiny_t5)
    return SimpleNamespace(datamodule=data, global_rank=0, world_size=1)


def test_same_seed_gives_identical_before_and_after_for_an_untrained_policy(
    tiny_t5, tiny_classifier, sample_data, perturbed_adapter
):
    # A non-zero starting adapter: the reference is a frozen copy of it, not the bare base model.
    module = untrained_module(tiny_t5, HFClassifierReward(tiny_classifier), perturbed_adapter)
    trainer = no_fit(sample_data, tiny_t5)
    evaluation = ToxicityEvaluation(num_prompts=6, max_new_tokens=8, samples_per_prompt=2, batch_size=4)
    before = evaluation.generate_and_score(trainer, module, reference=True)
    after = evaluation.generate_and_score(trainer, module, reference=False)
    assert after.responses == before.responses and after.toxicity.shape == (6, 2)
    np.testing.assert_array_equal(after.toxicity, before.toxicity)
    np.testing.assert_array_equal(after.reward, before.reward)
    with module.policy.pretrained_model.disable_adapter():  # the bare base model answers otherwise
        assert evaluation.generate_and_score(trainer, module, reference=False).responses != before.responses


class RecordingReward(RewardModel):
    """Records the texts of every `score` and `toxicity` call; scores 0."""

    def __init__(self, text) -> None:
        super().__init__(text)
        self.scored, self.judged = [], []

    def score(self, texts):
        self.scored += texts
        return torch.zeros(len(texts))

    def toxicity(self, texts):
        self.judged += texts
        return torch.zeros(len(texts))


@pytest.mark.parametrize("text", ["query_response", "response"])
def test_evaluation_judges_the_texts_the_reward_scores(tiny_t5, sample_data, text):
    reward, judge = RecordingReward(text), RecordingReward(text)
    module = untrained_module(tiny_t5, reward)
    evaluation = ToxicityEvaluation(num_prompts=4, max_new_tokens=6, text=text, judge=judge, batch_size=4)
    outputs = evaluation.generate_and_score(no_fit(sample_data, tiny_t5), module, reference=False)
    pairs = [(q, r[0]) for q, r in zip(outputs.queries, outputs.responses, strict=True)]
    expected = [q + r if text == "query_response" else r for q, r in pairs]
    assert reward.scored == reward.judged == judge.judged == expected


def test_cli_test_evaluates_a_checkpoint_without_training(tmp_path):
    run = [sys.executable, "train.py"]
    fit = subprocess.run(run + ["fit", "--config", "configs/tiny.yaml", "--trainer.limit_train_batches", "1",
                                "--trainer.default_root_dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, check=False)
    assert fit.returncode == 0, fit.stderr[-2000:]
    ckpt = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    test = subprocess.run(run + ["test", "--config", "configs/tiny.yaml", "--ckpt_path", str(ckpt),
                                 "--trainer.default_root_dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, check=False)
    assert test.returncode == 0, test.stderr[-2000:]
    assert "eval before (32 prompts x 1)" in test.stderr + test.stdout
    assert "eval checkpoint (32 prompts x 1)" in test.stderr + test.stdout
    report = json.loads((tmp_path / "lightning_logs" / "version_1" / "evaluation_report.json").read_text())
    assert report["num_prompts"] == 32
