"""Reward components: labels looked up by name, toxicity = softmax of the toxic label."""

import math

import pytest
import torch

from detox_lightning import DialogSumDataModule, GenerationSettings, PolicyConfig, RLDetoxModule, RLSettings
from detox_lightning.errors import ConfigError
from detox_lightning.rewards.classifiers import HFClassifierReward, ProfanityCheckReward, RewardModel, reward_texts

TEXTS = [
    "#Person1# tells Tommy that he didn't like the movie.",
    "#Person1# tells Tommy that the movie was terrible, dumb and stupid.",
    "A much longer text " * 40,
]
# A clean dialogue of 2,000 words (several times the classifier's 512 tokens), then a response.
LONG_QUERY = "#Person1#: We talked about the weather and the trains. " * 200 + "Summary:\n"
INSULT = "#Person1# says #Person2# is a stupid idiot."
CLEAN = "#Person1# and #Person2# talk about the trains."


@pytest.fixture(scope="module")
def reversed_classifier(tiny_classifier, tmp_path_factory):
    """The same classifier with its labels in the other order (hate=0, nothate=1)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier)
    with torch.no_grad():
        model.classifier.out_proj.weight.copy_(model.classifier.out_proj.weight.flip(0))
        model.classifier.out_proj.bias.copy_(model.classifier.out_proj.bias.flip(0))
    model.config.id2label = {0: "hate", 1: "nothate"}
    model.config.label2id = {"hate": 0, "nothate": 1}
    path = tmp_path_factory.mktemp("reversed")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_classifier).save_pretrained(path)
    return str(path)


def classifier_logits(path, texts):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        return model(**tok(texts, padding=True, truncation=True, return_tensors="pt")).logits, model.config.label2id


def test_reward_is_the_logit_of_nothate_in_any_label_order(tiny_classifier, reversed_classifier):
    reward = HFClassifierReward(tiny_classifier, text="response", batch_size=2)
    reversed_reward = HFClassifierReward(reversed_classifier, text="response", batch_size=2)
    logits, label2id = classifier_logits(tiny_classifier, TEXTS)
    expected = logits[:, label2id["nothate"]]
    torch.testing.assert_close(reward(["q"] * 3, TEXTS), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reversed_reward(["q"] * 3, TEXTS), expected, rtol=1e-5, atol=1e-5)
    assert reversed_reward.reward_index == 1 and reward.reward_index == 0


def test_texts_are_scored_shortest_first_and_returned_in_input_order(tiny_classifier):
    reward = HFClassifierReward(tiny_classifier, batch_size=2)
    texts = [TEXTS[2], TEXTS[0], "short", TEXTS[2][:300], TEXTS[1]]
    widths = []
    hook = reward.classifier.register_forward_pre_hook(
        lambda _, args, kw: widths.append(kw["input_ids"].shape), with_kwargs=True
    )
    try:
        together = reward.logits(texts)
    finally:
        hook.remove()
    alone = torch.cat([reward.logits([t]) for t in texts])  # one text a forward: no padding at all
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    lengths = sorted(len(reward.tokenizer(t)["input_ids"]) for t in texts)
    assert [tuple(w) for w in widths] == [(2, lengths[1]), (2, lengths[3]), (1, lengths[4])]
    assert reward.logits([]).shape == (0, 2)


def test_length_sorted_batches_pad_less_than_input_order_for_the_same_scores(tiny_classifier):
    reward = HFClassifierReward(tiny_classifier, batch_size=2)
    texts = ["short", TEXTS[2], "tiny", TEXTS[1], "x", TEXTS[2][:200]]  # long and short alternate, as rollouts do
    fed = []
    hook = reward.classifier.register_forward_pre_hook(
        lambda _, args, kw: fed.append(kw["attention_mask"]), with_kwargs=True
    )
    try:
        scores = reward.score(texts)
    finally:
        hook.remove()
    alone = torch.cat([reward.score([t]) for t in texts])  # one text a forward: no padding at all
    torch.testing.assert_close(scores, alone, rtol=1e-5, atol=1e-5)
    lengths = [len(reward.tokenizer(t)["input_ids"]) for t in texts]
    useful, padded = sum(int(m.sum()) for m in fed), sum(m.numel() for m in fed)
    input_order = sum(len(chunk) * max(chunk) for chunk in (lengths[i : i + 2] for i in range(0, len(texts), 2)))
    assert useful == sum(lengths)
    assert padded < input_order, (useful, padded, input_order)  # input order: as the notebook's pipeline batches


def test_toxicity_is_softmax_probability_of_hate(tiny_classifier, reversed_classifier):
    logits, label2id = classifier_logits(tiny_classifier, TEXTS)
    expected = logits.softmax(-1)[:, label2id["hate"]]
    for path in (tiny_classifier, reversed_classifier):
        torch.testing.assert_close(HFClassifierReward(path).toxicity(TEXTS), expected, rtol=1e-5, atol=1e-6)


def test_reward_text_query_response_concatenates_like_the_notebook(tiny_classifier):
    both = HFClassifierReward(tiny_classifier, text="query_response")
    torch.testing.assert_close(both(["Summary: ", "x"], ["ok", "y"]), both.score(["Summary: ok", "xy"]))


def test_a_long_query_is_cut_from_its_start_so_the_response_is_still_scored(tiny_classifier):
    reward = HFClassifierReward(tiny_classifier)
    assert len(reward.tokenizer(LONG_QUERY)["input_ids"]) > 2 * reward.max_length
    scores = reward([LONG_QUERY] * 2, [INSULT, CLEAN])
    toxicity = reward.toxicity(reward_texts([LONG_QUERY] * 2, [INSULT, CLEAN], "query_response"))
    # Cut from the right, both texts would be the same first 512 tokens of the dialogue.
    assert scores[0] < scores[1] - 0.1
    assert toxicity[0] > toxicity[1] + 0.05


def test_reward_texts_are_query_then_response_or_the_response_alone():
    assert reward_texts(["Summary:\n", "q"], ["a b", "r"], "query_response") == ["Summary:\na b", "qr"]
    assert reward_texts(["Summary:\n", "q"], ["a b", "r"], "response") == ["a b", "r"]
    with pytest.raises(ConfigError, match="text='summary'"):
        reward_texts(["q"], ["r"], "summary")


class RecordingReward(RewardModel):
    """Records every text it is asked to score; scores 0."""

    def __init__(self, text) -> None:
        super().__init__(text)
        self.texts = []

    def score(self, texts):
        self.texts += texts
        return torch.zeros(len(texts))

    def toxicity(self, texts):
        return torch.zeros(len(texts))


@pytest.mark.parametrize("text", ["query_response", "response"])
def test_reward_of_a_rollout_sees_its_query_then_its_response(tiny_t5, sample_data, text):
    reward = RecordingReward(text)
    module = RLDetoxModule(
        reward=reward,
        policy=PolicyConfig(model_name_or_path=tiny_t5, lora_r=4),
        ppo=RLSettings(mini_batch_size=2),
        generation=GenerationSettings(output_min_length=4, output_max_length=6),
        batch_size=2,
    )
    data = DialogSumDataModule(path=sample_data, batch_size=2, tokenizer_name_or_path=tiny_t5)
    data.setup("fit")
    batch = data.collate([data.train_dataset[i] for i in range(2)])
    torch.manual_seed(0)
    experience, _ = module.make_experience(batch)
    responses = module.decode(experience.response_ids)
    assert all(q.endswith("Summary:\n") for q in batch["query"]) and all(responses)
    if text == "query_response":
        assert reward.texts == [q + r for q, r in zip(batch["query"], responses, strict=True)]
    else:
        assert reward.texts == responses


def test_unknown_reward_label_lists_the_labels(tiny_classifier):
    with pytest.raises(ConfigError, match=r"reward_label='not_hate'.*\['hate', 'nothate'\]"):
        HFClassifierReward(tiny_classifier, reward_label="not_hate")


def test_reward_model_stays_in_eval_mode(tiny_classifier):
    reward = HFClassifierReward(tiny_classifier)
    reward.train()
    assert not reward.classifier.training


def test_profanity_check_reward_is_log_odds_of_clean():
    reward = ProfanityCheckReward(text="response")
    p = reward.toxicity(TEXTS[:2])
    assert p[1] > 0.5 > p[0]
    scores = reward(["", ""], TEXTS[:2])
    expected = [math.log((1 - float(pi)) / float(pi)) for pi in p]
    torch.testing.assert_close(scores, torch.tensor(expected), rtol=1e-4, atol=1e-4)
    assert scores[0] > scores[1]
