"""DialogSum data module: sources, filtering, the notebook's split, prompts and padding."""

from pathlib import Path

import pytest
from helpers import write_jsonl

from detox_lightning.data.datamodule import NOTEBOOK_PROMPT, DialogSumDataModule
from detox_lightning.errors import ConfigError

REAL_TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "dialogsum" / "train.jsonl"


@pytest.mark.skipif(not REAL_TRAIN.is_file(), reason="real DialogSum data (../shared/data/dialogsum) is absent")
def test_real_dialogsum_counts_match_the_notebook():
    splits = DialogSumDataModule(path=str(REAL_TRAIN)).load_splits()
    assert (len(splits["train"]), len(splits["test"])) == (8017, 2005)


def test_sample_data_prompts_and_right_padded_batches(sample_data, tiny_t5):
    data = DialogSumDataModule(path=sample_data, batch_size=4, tokenizer_name_or_path=tiny_t5)
    data.setup("fit")
    rows = data.load_splits()
    assert len(data.train_dataset) == len(rows["train"]) and len(data.test_dataset) == len(rows["test"])
    assert all(200 < len(d) <= 1000 for d in rows["train"]["dialogue"])
    # the notebook splits without shuffling: the test split is the tail of the filtered rows
    assert data.test_dataset[0]["id"] == rows["test"][0]["id"]
    batch = next(iter(data.train_dataloader()))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape[0] == 4 and ids.shape == mask.shape
    lengths = mask.sum(1)
    for row, n in zip(ids, lengths):
        assert (row[n:] == data.tokenizer.pad_token_id).all() and row[n - 1] == data.tokenizer.eos_token_id
    assert batch["query"][0].strip().startswith("Summarize the following conversation.")
    assert "Summary:" in batch["query"][0] and "summary" in batch


def dialogue(n):
    return ("#Person1#: " + "word " * n)[: n + 11]


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "parquet"])
def test_local_file_formats_and_dict_of_splits(tmp_path, suffix):
    import pandas as pd

    frame = pd.DataFrame({"id": [f"r{i}" for i in range(10)], "dialogue": [dialogue(300)] * 10, "summary": ["s"] * 10})
    path = tmp_path / f"train.{suffix}"
    if suffix == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif suffix == "csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    for source in (str(path), str(tmp_path), {"train": str(path)}):
        splits = DialogSumDataModule(path=source).load_splits()
        assert (len(splits["train"]), len(splits["test"])) == (8, 2)


def test_custom_prompt_template(tmp_path, tiny_t5):
    path = write_jsonl(tmp_path / "d.jsonl", [{"dialogue": dialogue(250)} for _ in range(10)])
    data = DialogSumDataModule(path=path, batch_size=2, prompt_template="TL;DR {dialogue}", tokenizer_name_or_path=tiny_t5)
    data.setup("fit")
    assert data.train_dataset[0]["query"].startswith("TL;DR")


@pytest.mark.parametrize(
    "rows,kwargs,message",
    [
        (None, {"path": "/nonexistent/dialogsum.jsonl"}, "no such data file '/nonexistent/dialogsum.jsonl'"),
        ([{"text": "x" * 300}] * 4, {}, "no 'dialogue' column; its columns are \\['text'\\]"),
        ([{"dialogue": "too short"}] * 4, {}, "0 of 4 dialogues have 200 < characters <= 1000"),
        ([{"dialogue": dialogue(300)}] * 4, {"min_chars": 500, "max_chars": 500}, "min_chars=500 must be smaller"),
        ([{"dialogue": dialogue(300)}] * 4, {"split": "validation"}, "data.split='validation' is not among"),
    ],
)
def test_bad_data_is_named(tmp_path, rows, kwargs, message):
    if rows is not None:
        kwargs = {"path": write_jsonl(tmp_path / "train.jsonl", rows)} | kwargs
    with pytest.raises(ConfigError, match=message):
        DialogSumDataModule(**kwargs).load_splits()


def test_default_prompt_is_the_notebooks():
    assert NOTEBOOK_PROMPT == "\nSummarize the following conversation.\n\n{dialogue}\n\nSummary:\n"


def test_every_rank_shuffles_with_rank_zeros_seed(sample_data, tiny_t5):
    """Ranks shard one order: were they seeded differently, their shards could overlap."""
    from types import SimpleNamespace

    data = DialogSumDataModule(path=sample_data, batch_size=4, tokenizer_name_or_path=tiny_t5)
    data.setup("fit")
    rank_zero_seed = 1234
    data.trainer = SimpleNamespace(strategy=SimpleNamespace(broadcast=lambda obj, src=0: rank_zero_seed))
    assert data.train_dataloader().sampler.seed == rank_zero_seed


def long_dialogue(chars=1000):
    """A DialogSum-like dialogue of about `chars` characters (the shipped configs keep up to 1000)."""
    turns = ["#Person1#: Could you tell me how to get to the station from here?",
             "#Person2#: Sure. Go straight on and turn left at the second crossing, then it is on your right."]
    text = "\n".join(turns[i % 2] for i in range(chars // 40))
    return text[:chars]


def truncating_data(tiny_t5, max_prompt_tokens):
    data = DialogSumDataModule(batch_size=2, max_prompt_tokens=max_prompt_tokens, tokenizer_name_or_path=tiny_t5)
    data.tokenizer = data.load_tokenizer()
    data.check_prompt_budget()
    return data


def assert_fits_with_instruction(data, dialogue, max_prompt_tokens):
    """The prompt keeps its instruction, fits, and holds the longest dialogue prefix that fits."""
    row = data.tokenize({"dialogue": dialogue})
    ids, query = row["input_ids"], row["query"]
    assert len(ids) <= max_prompt_tokens and ids[-1] == data.tokenizer.eos_token_id
    assert query.rstrip().endswith("Summary:"), query[-80:]  # the instruction after the dialogue survived
    assert query.strip().startswith("Summarize the following conversation.")

    def prompt_ids(k):  # the prompt of the dialogue's first k tokens
        offsets = data.tokenizer(dialogue, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return data.tokenizer(NOTEBOOK_PROMPT.format(dialogue=dialogue[: offsets[k - 1][1]]))["input_ids"]

    kept = next(k for k in range(1, max_prompt_tokens) if prompt_ids(k) == ids)  # a cut at a token boundary
    assert len(prompt_ids(kept + 1)) > max_prompt_tokens  # one token more would not fit
    return ids


@pytest.mark.parametrize("max_prompt_tokens", [16, 64, 200])
def test_max_prompt_tokens_cuts_the_dialogue_and_keeps_the_instruction(tiny_t5, max_prompt_tokens):
    data = truncating_data(tiny_t5, max_prompt_tokens)
    dialogue = long_dialogue()
    assert len(data.tokenizer(NOTEBOOK_PROMPT.format(dialogue=dialogue))["input_ids"]) > max_prompt_tokens
    assert_fits_with_instruction(data, dialogue, max_prompt_tokens)
    short = "#Person1#: Hi. #Person2#: Hello."
    assert data.tokenize({"dialogue": short})["input_ids"] == data.tokenizer(NOTEBOOK_PROMPT.format(dialogue=short))[
        "input_ids"
    ]  # prompts that fit are left alone


@pytest.mark.skipif(not REAL_TRAIN.is_file(), reason="real DialogSum data (../shared/data/dialogsum) is absent")
def test_max_prompt_tokens_keeps_the_instruction_on_real_dialogsum(tiny_t5):
    import json

    with open(REAL_TRAIN) as f:
        dialogues = [d for d in (json.loads(line)["dialogue"] for line in f) if 900 < len(d) <= 1000][:20]
    data = truncating_data(tiny_t5, 96)
    for dialogue in dialogues:
        assert_fits_with_instruction(data, dialogue, 96)


@pytest.mark.parametrize("max_prompt_tokens", [5, 10])
def test_max_prompt_tokens_too_small_for_the_template_is_named(sample_data, tiny_t5, max_prompt_tokens):
    # the tiny tokenizer writes the notebook's template in 10 tokens, </s> included
    data = DialogSumDataModule(path=sample_data, max_prompt_tokens=max_prompt_tokens, tokenizer_name_or_path=tiny_t5)
    with pytest.raises(ConfigError, match=rf"max_prompt_tokens={max_prompt_tokens} leaves no room .* takes 10 tokens"):
        data.setup("fit")
