"""One implementation of each mechanism: the seq2seq/causal model-class choice, the pad-token rule
and the dtype table each live in one module (the atomic writer's scan is in test_atomic.py)."""

import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "detox_lightning"


def modules_matching(pattern: str) -> set[str]:
    regex = re.compile(pattern)
    return {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if regex.search(p.read_text(encoding="utf-8"))}


@pytest.mark.parametrize(("what", "pattern", "homes"), [
    ("the model class of an architecture", r"AutoModelForSeq2SeqLM|AutoModelForCausalLM|is_encoder_decoder",
     {"models/architectures.py", "trl_compat.py"}),
    ("the pad-with-EOS rule", r"\.pad_token\s*=[^=]", {"models/architectures.py"}),
    ("the dtype table", r"^DTYPES\s*=", {"models/dtypes.py"}),
])
def test_each_mechanism_has_one_home(what, pattern, homes):
    assert modules_matching(pattern if not pattern.startswith("^") else f"(?m){pattern}") == homes, what


def test_the_scan_sees_a_second_copy(tmp_path, monkeypatch):
    copy = tmp_path / "detox_lightning"
    (copy / "models").mkdir(parents=True)
    (copy / "models" / "architectures.py").write_text("tokenizer.pad_token = tokenizer.eos_token\n")
    (copy / "data.py").write_text("if tok.pad_token is None:\n    tok.pad_token = tok.eos_token\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", copy)
    assert modules_matching(r"\.pad_token\s*=[^=]") == {"models/architectures.py", "data.py"}
