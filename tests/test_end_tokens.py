"""Every id that ends a response counts: a chat model whose end of turn is not its EOS stops on it
in rollouts, evaluation and predictions, and its mask, missing-EOS penalty, monitor EOS rate and
SFT targets count it."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from detox_lightning import DialogSumDataModule, GenerationSettings, PolicyConfig, RLDetoxModule, RLSettings
from detox_lightning.evaluation.monitor import RolloutStats
from detox_lightning.models.end_tokens import end_token_ids, turn_end_id
from detox_lightning.rewards import FunctionReward
from detox_lightning.rl.masks import response_mask
from detox_lightning.training import SFTSummarizationModule

TURN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_chat(tiny_llama, tmp_path_factory):
    """The tiny Llama with Qwen-style turns: `<|im_end|>` ends a turn, `</s>` stays its EOS, and the
    end of turn's output row is lifted so that a random model writes it within a few tokens."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = TURN_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model.resize_token_embeddings(len(tokenizer))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    # A random model writes <|im_end|> about once in 2,000 draws. Its final hidden states share a
    # direction (their mean), so an output row along it gives the end of turn a logit of ~3-6 against
    # ~0 for the rest: drawn at ~1-20% a step, within a few tokens in most rows, as a trained model would.
    enc = tokenizer(["#Person1#: Hello there. #Person2#: Hi, how are you doing today?"] * 4, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc, output_hidden_states=True).hidden_states[-1].reshape(-1, model.config.hidden_size)
        direction = hidden.mean(dim=0)
        model.get_output_embeddings().weight[im_end] = 1.5 * direction / direction.norm()
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=[im_end, tokenizer.eos_token_id])
    out = tmp_path_factory.mktemp("tiny_chat")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out), im_end, tokenizer.eos_token_id


def test_the_end_ids_are_the_generation_configs_and_the_tokenizers():
    tokenizer = type("T", (), {"eos_token_id": 2})()
    assert end_token_ids(GenerationConfig(eos_token_id=[7, 2]), tokenizer) == [7, 2]
    assert end_token_ids(GenerationConfig(eos_token_id=7), tokenizer) == [7, 2]
    assert end_token_ids(GenerationConfig(), tokenizer) == [2]


def test_the_mask_ends_at_the_first_of_any_end_id():
    ids = torch.tensor([[5, 7, 9, 2], [5, 2, 7, 9], [5, 6, 8, 9]])
    assert response_mask(ids, [7, 2]).tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert response_mask(ids, 2).tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]]  # one id: as before


def test_sft_targets_end_with_the_end_of_turn_not_eos(tiny_chat, tmp_path):
    path, im_end, eos = tiny_chat
    assert turn_end_id(AutoTokenizer.from_pretrained(path), [im_end, eos]) == im_end
    sft = SFTSummarizationModule(policy=PolicyConfig(model_name_or_path=path, lora_r=4), adapter_dir=str(tmp_path / "a"))
    target, mask = sft.targets(["a short summary", "a"])
    last = mask.sum(dim=1) - 1
    assert target[torch.arange(2), last].tolist() == [im_end, im_end]


@pytest.mark.slow
def test_rollouts_stop_on_the_end_of_turn_and_every_figure_counts_it(tiny_chat, sample_data):
    path, im_end, eos = tiny_chat
    module = RLDetoxModule(
        reward=FunctionReward(function="reward_fns:longer_is_better", toxicity_function="reward_fns:toxicity_of_idiot"),
        policy=PolicyConfig(model_name_or_path=path, lora_r=4),
        ppo=RLSettings(mini_batch_size=8, missing_eos_penalty=100.0),
        generation=GenerationSettings(min_length=1, output_min_length=24, output_max_length=24),
        batch_size=8,
    )
    assert module.end_token_ids == [im_end, eos]
    data = DialogSumDataModule(path=sample_data, batch_size=8, tokenizer_name_or_path=path)
    data.setup("fit")
    batch = data.collate([data.train_dataset[i] for i in range(8)])
    torch.manual_seed(2)  # a seed whose rollout (default sampling: inverse CDF) has a row ending on the end of turn
    _exp, _stats = module.make_experience(batch)
    record = module.last_rollout
    ends_on_turn = [bool((row[: int(m.sum())] == im_end).any()) for row, m in zip(record.response_ids, record.mask, strict=True)]
    assert any(ends_on_turn), record.response_ids  # the model wrote its end of turn and generation stopped there
    for row, m in zip(record.response_ids, record.mask, strict=True):
        length = int(m.sum())
        if length < 24:  # stopped early: on an end id, the last masked token, nothing after it
            assert int(row[length - 1]) in (im_end, eos) and bool((row[length:] == module.tokenizer.pad_token_id).all())
    # the missing-EOS penalty spares responses that ended on the end of turn
    raw = module.reward(record.queries, record.responses)
    shaped = module.shape_scores(raw.clone(), record.response_ids)
    assert torch.equal(shaped[torch.tensor(ends_on_turn)], raw[torch.tensor(ends_on_turn)])
    # the monitor counts them as ended
    assert RolloutStats.of(record).eos == [bool(int(r[int(m.sum()) - 1]) in (im_end, eos)) for r, m in zip(record.response_ids, record.mask, strict=True)]
    assert sum(RolloutStats.of(record).eos) >= sum(ends_on_turn)
    # evaluation and predictions sample through the same kwargs: the same stop
    kwargs = module.generation_kwargs(8)
    assert kwargs["eos_token_id"] == [im_end, eos]
