"""Fluency under a separate evaluator LM (the literature's GPT-2 XL role): the perplexity of each
response given its prompt, against a naive one-row-at-a-time loop in float64, higher for
shuffled text, and usable from the evaluate command for a seq2seq policy."""

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from detox_lightning.errors import ConfigError
from detox_lightning.models.fluency import EvaluatorLM

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["#Person1#: Hello, how are you today?", "Summary:", "A much longer prompt " * 12, "Hi"]
RESPONSES = [" I am fine, thanks.", " The person greets.", "", " ok ok ok ok ok ok ok ok ok ok ok ok ok ok ok ok ok ok"]


def naive_log_perplexity(path, prompt, response):
    """Mean NLL of the response tokens, one unpadded row, summed in float64."""
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    p, r = tok(prompt).input_ids, tok(response, add_special_tokens=False).input_ids
    if not r:
        return float("nan")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p + r])).logits[0].double()  # (L, V)
    logprobs = torch.log_softmax(logits, dim=-1)
    total = sum(float(logprobs[len(p) + i - 1, token]) for i, token in enumerate(r))
    return -total / len(r)


def test_batched_log_perplexity_equals_a_naive_loop_and_an_empty_response_is_nan(tiny_llama):
    evaluator = EvaluatorLM(tiny_llama, batch_size=3)  # rows of different lengths share a padded batch
    got = evaluator.log_perplexity(PROMPTS, RESPONSES)
    assert got.dtype == torch.float64 and got.shape == (4,)
    for value, prompt, response in zip(got.tolist(), PROMPTS, RESPONSES, strict=True):
        expected = naive_log_perplexity(tiny_llama, prompt, response)
        if math.isnan(expected):
            assert math.isnan(value)
        else:
            assert value == pytest.approx(expected, abs=1e-5), (prompt, response)


def test_the_evaluators_own_samples_are_less_perplexing_than_the_same_words_shuffled(tiny_llama):
    evaluator = EvaluatorLM(tiny_llama)
    tok, model = evaluator.tokenizer, evaluator.model
    torch.manual_seed(0)
    prompts = [f"#Person1#: {w} is here. #Person2#: Summary:" for w in ("Anna", "Bob", "Carl", "Dora", "Emil", "Fay")]
    texts = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, do_sample=True, max_new_tokens=24, min_new_tokens=24, pad_token_id=tok.pad_token_id)
        texts.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    rng = random.Random(0)
    shuffled = [" ".join(rng.sample(t.split(), len(t.split()))) for t in texts]
    own, mixed = evaluator.log_perplexity(prompts, texts), evaluator.log_perplexity(prompts, shuffled)
    assert torch.isfinite(own).all()
    assert torch.equal(own, evaluator.log_perplexity(prompts, texts))  # stable
    assert float(mixed.mean()) > float(own.mean()) + 0.1, (own, mixed)


def test_an_evaluator_that_cannot_be_loaded_is_one_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"evaluator_model_name_or_path='.*nowhere' could not be loaded"):
        EvaluatorLM(str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="evaluator_dtype='float16' is not one of float32, bfloat16"):
        EvaluatorLM("builtin:tiny-llama", dtype="float16")


@pytest.mark.slow
def test_the_evaluate_command_scores_fluency_under_the_named_evaluator(tmp_path, tiny_llama):
    # A seq2seq policy (tiny T5) judged by a causal evaluator: the decoded text is retokenised
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "detox_lightning.evaluate", "--config", str(ROOT / "configs" / "tiny.yaml"),
           "--out", str(out), "--num-prompts", "4", "--samples-per-prompt", "2", "--max-new-tokens", "10",
           "--evaluator", "builtin:tiny-llama"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fluency: perplexity of the responses given their prompts under builtin:tiny-llama" in result.stdout
    (row,) = json.loads((out / "table.json").read_text())
    assert row["fluency_evaluator"] == "builtin:tiny-llama"
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8
    evaluator = EvaluatorLM(tiny_llama)
    again = evaluator.log_perplexity([s["prompt"] for s in samples], [s["text"] for s in samples]).tolist()
    for sample, value in zip(samples, again, strict=True):
        assert sample["log_perplexity"] == pytest.approx(value, abs=1e-6, nan_ok=True)
    bad = subprocess.run([*cmd[:-1], str(tmp_path / "nowhere")], capture_output=True, text=True, cwd=ROOT, timeout=600, check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: evaluator_model_name_or_path=")
