import hashlib
import json
import re

import pytest
from datasets import load_dataset

from detox_lightning.offline.sample_data import contains_insult, make_dialogues, write_splits

TURN = re.compile(r"^#Person[123]#: \S")


def test_same_seed_same_rows():
    assert make_dialogues(50, seed=3, toxic_fraction=0.3) == make_dialogues(50, seed=3, toxic_fraction=0.3)


def test_different_seed_different_rows():
    a, b = make_dialogues(50, seed=0), make_dialogues(50, seed=1)
    assert [r["dialogue"] for r in a] != [r["dialogue"] for r in b]


def test_output_is_pinned():
    # Guards "same rows on every machine"; after changing templates on purpose, update the digest
    # and bump its version in builtin._VERSIONS so cached builds are rebuilt.
    text = json.dumps(make_dialogues(30, seed=0, toxic_fraction=0.3), sort_keys=True)
    assert hashlib.sha256(text.encode()).hexdigest()[:16] == "2ff70c0123a7f446"


def test_rows_look_like_dialogsum():
    rows = make_dialogues(500, seed=0)
    assert [r["id"] for r in rows[:2]] == ["sample_00000", "sample_00001"]
    for row in rows:
        assert list(row) == ["id", "dialogue", "summary", "topic"]
        assert all(TURN.match(turn) for turn in row["dialogue"].split("\n"))
        assert "#Person" in row["summary"]
    assert len({r["topic"] for r in rows}) >= 12
    assert any("#Person3#" in r["dialogue"] for r in rows)
    assert len({r["dialogue"] for r in rows}) > 0.98 * len(rows)  # only a few short fragments repeat


def test_about_ninety_percent_pass_the_length_filter():
    lengths = [len(r["dialogue"]) for r in make_dialogues(1000, seed=0)]
    kept = sum(200 < n <= 1000 for n in lengths) / len(lengths)
    assert 0.85 <= kept <= 0.95
    assert any(n <= 200 for n in lengths) and any(n > 1000 for n in lengths)


@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_toxic_fraction_is_honoured(fraction):
    rows = make_dialogues(200, seed=0, toxic_fraction=fraction)
    assert sum(contains_insult(r["summary"]) for r in rows) == round(fraction * 200)
    assert not any(contains_insult(r["dialogue"]) for r in rows)


def test_toxic_fraction_only_changes_the_rude_summaries():
    clean, rude = make_dialogues(100, seed=0), make_dialogues(100, seed=0, toxic_fraction=0.5)
    assert [r["dialogue"] for r in clean] == [r["dialogue"] for r in rude]
    for c, r in zip(clean, rude):
        assert r["summary"] == c["summary"] or (contains_insult(r["summary"]) and c["summary"] in r["summary"])


def test_contains_insult_matches_whole_words():
    assert contains_insult("#Person1# tells #Person2# to shut up.")
    assert not contains_insult("Whatever you like.")


def test_bad_toxic_fraction_is_rejected():
    with pytest.raises(ValueError, match="toxic_fraction"):
        make_dialogues(10, toxic_fraction=1.5)


def test_write_splits(tmp_path):
    out = write_splits(tmp_path / "data", n_train=60, n_validation=20, n_test=20, seed=0, toxic_fraction=0.3)
    files = {split: str(out / f"{split}.jsonl") for split in ("train", "validation", "test")}
    data = load_dataset("json", data_files=files)
    assert {split: data[split].num_rows for split in files} == {"train": 60, "validation": 20, "test": 20}
    assert all(data[split].column_names == ["id", "dialogue", "summary", "topic"] for split in files)
    ids = [i for split in files for i in data[split]["id"]]
    assert len(set(ids)) == len(ids)
    assert data["validation"]["dialogue"] != data["test"]["dialogue"]
    first = json.loads((out / "train.jsonl").read_text().splitlines()[0])
    assert first["id"] == "train_00000"
