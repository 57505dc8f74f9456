import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoModelForSequenceClassification, AutoTokenizer

from detox_lightning.offline import builtin
from detox_lightning.offline.sample_data import make_dialogues


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DETOX_LIGHTNING_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Both tiny models, built once for this module into its own cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DETOX_LIGHTNING_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield {"t5": builtin.resolve("builtin:tiny-t5"), "roberta": builtin.resolve("builtin:tiny-hate-roberta")}


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("DETOX_LIGHTNING_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert builtin.cache_dir() == tmp_path / "home" / ".cache" / "detox_lightning"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert builtin.cache_dir() == tmp_path / "xdg" / "detox_lightning"
    monkeypatch.setenv("DETOX_LIGHTNING_CACHE", str(tmp_path / "own"))
    assert builtin.cache_dir() == tmp_path / "own"


@pytest.mark.parametrize("name", ["google/flan-t5-base", "/data/models/t5", "builtin"])
def test_other_strings_pass_through(cache, name):
    assert builtin.resolve(name) == name
    assert not cache.exists()


def test_unknown_builtin_lists_the_known_names(cache):
    with pytest.raises(ValueError, match="builtin:nope") as error:
        builtin.resolve("builtin:nope")
    assert all(name in str(error.value) for name in builtin.known_names())


def test_resolve_builds_once(cache, monkeypatch):
    path = Path(builtin.resolve("builtin:sample-dialogsum"))
    assert path == cache / "sample-dialogsum-v1"
    assert {p.name for p in path.iterdir()} == {"train.jsonl", "validation.jsonl", "test.jsonl", builtin._MARKER}
    stamp = (path / builtin._MARKER).stat().st_mtime_ns

    def fail(_):
        raise AssertionError("rebuilt")

    monkeypatch.setitem(builtin._BUILDERS, "sample-dialogsum", fail)
    assert builtin.resolve("builtin:sample-dialogsum") == str(path)
    assert (path / builtin._MARKER).stat().st_mtime_ns == stamp
    assert [p.name for p in cache.iterdir()] == [path.name]  # no temp dir left behind


def test_losing_the_rename_race_uses_the_winner(cache):
    target = cache / "thing-v1"

    def build_while_another_process_finishes(tmp):
        (tmp / "mine").write_text("")
        target.mkdir(parents=True)
        (target / "theirs").write_text("")
        (target / builtin._MARKER).write_text("")

    builtin._build_atomically(target, build_while_another_process_finishes)
    assert {p.name for p in target.iterdir()} == {"theirs", builtin._MARKER}
    assert [p.name for p in cache.iterdir()] == [target.name]


def test_concurrent_builds_agree(cache):
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(builtin.resolve("builtin:sample-dialogsum"))) for _ in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert paths[0] == paths[1] and (Path(paths[0]) / builtin._MARKER).is_file()
    assert len(list(cache.iterdir())) == 1


def test_incomplete_target_is_reported(cache):
    (cache / "sample-dialogsum-v1").mkdir(parents=True)
    (cache / "sample-dialogsum-v1" / "train.jsonl").write_text("")
    with pytest.raises(RuntimeError, match="incomplete"):
        builtin.resolve("builtin:sample-dialogsum")


def test_builds_are_deterministic(built, cache):
    again = Path(builtin.resolve("builtin:tiny-t5"))
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (Path(built["t5"]) / name).read_bytes(), name


def test_tokenizer_round_trips_text():
    texts = [t for r in make_dialogues(20, seed=7, toxic_fraction=0.5) for t in (r["dialogue"], r["summary"])]
    special = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    tokenizer = builtin.train_tokenizer(texts, 300, special, single="$A </s>")
    assert len(tokenizer) == 300
    for text in [*texts[:6], "#Person1#: Hi!\n#Person2#: Zebras cost 12.50 dollars, don't they?"]:
        ids = tokenizer(text).input_ids
        assert ids[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tiny_t5_loads_and_generates(built):
    tokenizer = AutoTokenizer.from_pretrained(built["t5"])
    model = AutoModelForSeq2SeqLM.from_pretrained(built["t5"])
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.model_max_length == 1024 and 1000 <= len(tokenizer) <= 2000
    assert model.config.vocab_size == len(tokenizer) and model.config.d_model == 64
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()  # untied, like FLAN-T5
    assert (model.generation_config.decoder_start_token_id, model.generation_config.eos_token_id) == (0, 1)
    texts = ["#Person1#: How much is the red coat?\n#Person2#: 40 dollars.", "Hi"]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    assert batch.input_ids[0, -1] == 1 and batch.input_ids[1, -1] == 0  # eos appended, then right padding
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 2 and 2 <= out.shape[1] <= 5 and (out[:, 0] == 0).all()
    text = "#Person1#: Where is the library?\n#Person2#: On the second floor."
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text


def test_tiny_classifier_scores_a_padded_batch(built):
    tokenizer = AutoTokenizer.from_pretrained(built["roberta"])
    model = AutoModelForSequenceClassification.from_pretrained(built["roberta"])
    assert model.config.id2label == {0: "nothate", 1: "hate"} and model.config.label2id == {"nothate": 0, "hate": 1}
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    texts = ["You are a stupid idiot.", "#Person1# buys a red coat for 40 dollars."]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    assert (batch.input_ids[:, 0] == 0).all() and not batch.attention_mask.all()
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 2)
    long = tokenizer(["word " * 2000], truncation=True, return_tensors="pt")
    assert long.input_ids.shape == (1, 512) and long.input_ids[0, -1] == tokenizer.eos_token_id
    with torch.no_grad():
        assert model(**long).logits.shape == (1, 2)


def test_tiny_classifier_flags_the_sample_insults(built):
    """The hand-wired classifier: p(hate) > 0.5 exactly for the sample summaries with an insult,
    more insults score higher, and padding in a batch changes nothing."""
    from detox_lightning.offline.sample_data import contains_insult, make_dialogues

    tokenizer = AutoTokenizer.from_pretrained(built["roberta"])
    model = AutoModelForSequenceClassification.from_pretrained(built["roberta"]).eval()

    def p_hate(texts):
        with torch.no_grad():
            logits = model(**tokenizer(texts, return_tensors="pt", padding=True)).logits
        return logits.softmax(-1)[:, model.config.label2id["hate"]]

    summaries = [row["summary"] for row in make_dialogues(120, seed=3, toxic_fraction=0.4)]
    rude = torch.tensor([contains_insult(s) for s in summaries])
    assert 0 < rude.sum() < len(summaries)
    toxic = p_hate(summaries)
    assert torch.equal(toxic > 0.5, rude)
    one, two = "#Person1# thinks #Person2# is an idiot and a bore.", "#Person1# thinks #Person2# is a stupid idiot."
    assert p_hate([two]) > p_hate([one]) > 0.5
    alone = torch.cat([p_hate([s]) for s in summaries[:6]])
    torch.testing.assert_close(p_hate(summaries[:6]), alone)
