"""DialogSum data module: sources, filtering, the notebook's split, prompts and padding."""

from pathlib import Path

import pytest
from helpers import write_jsonl

from detox_lightning.data import NOTEBOOK_PROMPT, DialogSumDataModule
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
