"""The offline RealToxicityPrompts quick start: its built-in data, and both stages end to end."""

import hashlib
import json
from pathlib import Path

import pytest
from datasets import load_dataset

from detox_lightning import DialogSumDataModule, HFClassifierReward
from detox_lightning.offline.sample_data import contains_insult
from detox_lightning.offline.sample_rtp import make_rows

ROOT = Path(__file__).resolve().parents[1]
# The RL stage may make the continuations this much less likely under the frozen SFT adapter, in
# mean log-perplexity (perplexity times e at most): it may move away from the insults, not into noise.
MAX_LOG_PERPLEXITY_RISE = 1.0


@pytest.fixture(scope="module")
def sample_rtp(tiny_cache):
    from detox_lightning.offline.builtin import resolve

    return resolve("builtin:sample-rtp")


def test_same_seed_same_rows():
    assert make_rows(40, seed=3) == make_rows(40, seed=3) != make_rows(40, seed=4)


def test_output_is_pinned():
    # Guards "same rows on every machine"; after changing templates on purpose, update the digest
    # and bump "sample-rtp" in builtin._VERSIONS so cached builds are rebuilt.
    text = json.dumps(make_rows(30, seed=0), sort_keys=True)
    assert hashlib.sha256(text.encode()).hexdigest()[:16] == "dc43fe2f08921535"


def test_builtin_rows_have_the_real_toxicity_prompts_shape(sample_rtp):
    splits = {split: load_dataset("json", data_files=str(Path(sample_rtp) / f"{split}.jsonl"), split="train")
              for split in ("train", "validation", "test")}
    assert {split: len(rows) for split, rows in splits.items()} == {"train": 1000, "validation": 200, "test": 200}
    rows = splits["train"].to_list()
    assert set(rows[0]) == {"filename", "begin", "end", "challenging", "prompt", "continuation"}
    for row in rows:
        assert {"text", "toxicity"} <= set(row["prompt"]) and {"text", "toxicity"} <= set(row["continuation"])
        assert isinstance(row["challenging"], bool) and row["end"] - row["begin"] == len(row["prompt"]["text"]) + len(
            row["continuation"]["text"])
    share = sum(r["challenging"] for r in rows) / len(rows)
    assert 0.2 < share < 0.5
    rude = [contains_insult(r["continuation"]["text"]) for r in rows]
    assert 0.25 < sum(rude) / len(rows) < 0.55
    # rude continuations score as toxic and clean ones do not, the classifier's way too
    assert min(r["continuation"]["toxicity"] for r, bad in zip(rows, rude) if bad) > 0.5
    assert max(r["continuation"]["toxicity"] for r, bad in zip(rows, rude) if not bad) < 0.5
    # the tense (challenging) prompts lead to rudeness more often, and score higher
    rate = {flag: sum(bad for r, bad in zip(rows, rude) if r["challenging"] == flag) for flag in (True, False)}
    assert rate[True] / sum(r["challenging"] for r in rows) > 2 * rate[False] / sum(not r["challenging"] for r in rows)
    toxicities = [r["prompt"]["toxicity"] for r in rows]
    assert min(toxicities) < 0.1 and max(toxicities) > 0.8


def test_rude_continuations_are_what_the_tiny_classifier_flags(sample_rtp, tiny_classifier):
    rows = load_dataset("json", data_files=str(Path(sample_rtp) / "test.jsonl"), split="train").to_list()[:80]
    texts = [r["continuation"]["text"] for r in rows]
    toxicity = HFClassifierReward(model_name_or_path=tiny_classifier, text="response").toxicity(texts)
    flagged = [float(t) > 0.5 for t in toxicity]
    assert flagged == [contains_insult(t) for t in texts] and 10 < sum(flagged) < 70


@pytest.mark.parametrize(
    "filter, check",
    [
        ("challenging == true", lambda row: row["challenging"] is True),
        ("challenging == false", lambda row: row["challenging"] is False),
        ("challenging != true", lambda row: row["challenging"] is False),
        ("prompt.toxicity > 0.3", lambda row: row["prompt"]["toxicity"] > 0.3),
    ],
)
def test_filters_select_a_subset_of_the_builtin_data(sample_rtp, filter, check):
    data = DialogSumDataModule(path="builtin:sample-rtp", text_column="prompt.text", filter=filter, min_chars=0,
                               prompt_template="{dialogue}", prompt_format="plain")
    splits = data.load_splits()
    kept = splits["train"].to_list() + splits["test"].to_list()
    assert 100 < len(kept) < 900 and all(check(row) for row in kept)


def test_target_column_gives_the_sft_stage_continuations(sample_rtp):
    data = DialogSumDataModule(path="builtin:sample-rtp", text_column="prompt.text", target_column="continuation.text",
                               min_chars=0, prompt_template="{dialogue}", prompt_format="plain")
    row = data.load_splits()["train"][0]
    assert row["dialogue"] == row["prompt"]["text"] and row["summary"] == row["continuation"]["text"]


def test_a_missing_target_column_is_named(sample_rtp):
    from detox_lightning.errors import ConfigError

    data = DialogSumDataModule(path="builtin:sample-rtp", text_column="prompt.text", target_column="continuation.body",
                               min_chars=0, prompt_template="{dialogue}")
    with pytest.raises(ConfigError, match="data.target_column='continuation.body': column 'continuation' has no field 'body'"):
        data.load_splits()


@pytest.mark.slow
def test_rtp_quick_start_lowers_expected_maximum_toxicity(tmp_path):
    """Both stages of the RealToxicityPrompts quick start, the SFT one shortened: expected maximum
    toxicity falls with a CI below 0 under the reward's classifier and under the judge, and the
    continuations stay nearly as likely under the frozen SFT adapter."""
    from detox_lightning.cli import main

    adapter = tmp_path / "adapter"
    main(["fit", "--config", str(ROOT / "configs" / "tiny_causal_rtp_sft.yaml"), "--trainer.max_epochs", "3",
          "--trainer.default_root_dir", str(tmp_path / "sft"), "--model.init_args.adapter_dir", str(adapter),
          "--trainer.enable_progress_bar", "false"])
    assert (adapter / "adapter_model.safetensors").is_file()
    main(["fit", "--config", str(ROOT / "configs" / "tiny_causal_rtp.yaml"), "--trainer.default_root_dir",
          str(tmp_path / "detox"), "--model.init_args.policy.adapter_name_or_path", str(adapter),
          "--trainer.enable_progress_bar", "false"])
    report = json.loads(next((tmp_path / "detox").rglob("evaluation_report.json")).read_text())
    before, after = report["before"], report["after"]
    assert before["eval/toxicity_exp_max"] > 0.5 and before["eval/judge_toxicity_exp_max"] > 0.5  # SFT taught rudeness
    assert after["eval/toxicity_exp_max_delta_ci_high"] < 0, after
    assert after["eval/judge_toxicity_exp_max_delta_ci_high"] < 0, after  # not only the classifier RL optimised
    assert after["eval/log_perplexity_delta"] < MAX_LOG_PERPLEXITY_RISE, after
    assert after["eval/toxicity_prob"] <= before["eval/toxicity_prob"]
    assert all(0 < after[f"eval/dist{n}"] <= 1 for n in (1, 2, 3))
