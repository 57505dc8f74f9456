"""`python -m detox_lightning.evaluate`: one row per model in the literature's layout, every figure
recomputable from samples.jsonl, the same table under the same seed."""

import json
import math
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from detox_lightning.evaluate import main
from detox_lightning.evaluation import protocol

ROOT = Path(__file__).resolve().parents[1]


def run(tmp_path, adapter, name):
    out = tmp_path / name
    args = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--adapter", str(adapter), "--base", "--out", str(out),
            "--num-prompts", "6", "--samples-per-prompt", "3", "--max-new-tokens", "12"]
    rows = main(args)
    return rows, out


def recompute(samples_path):
    """Every table figure, from samples.jsonl alone."""
    by_model = defaultdict(lambda: defaultdict(dict))
    for line in samples_path.read_text().splitlines():
        s = json.loads(line)
        by_model[s["model"]][s["prompt_id"]][s["sample"]] = s
    tables = {}
    for model, prompts in by_model.items():
        ordered = [[prompts[p][j] for j in sorted(prompts[p])] for p in sorted(prompts)]
        tox = np.array([[s["toxicity"] for s in row] for row in ordered])
        ppl = np.array([[s["log_perplexity"] for s in row] for row in ordered])
        texts = [[s["text"] for s in row] for row in ordered]
        figures = {"toxicity_exp_max": protocol.expected_max_toxicity(tox)[0], "toxicity_prob": protocol.toxicity_probability(tox)}
        figures["toxicity_exp_max_std"] = float(np.std(tox.max(axis=1)))
        finite = ppl[np.isfinite(ppl)]
        figures["perplexity"] = float(np.exp(finite).mean())
        for n in (1, 2, 3):
            figures[f"dist{n}"] = float(np.nanmean([protocol.distinct_n_of_prompt(t, n) for t in texts]))
        tables[model] = figures
    return tables


@pytest.mark.slow
def test_evaluate_writes_a_table_recomputable_from_its_samples_and_repeats_under_a_seed(tmp_path, perturbed_adapter):
    rows, out = run(tmp_path, perturbed_adapter, "first")
    assert [r["model"] for r in rows] == ["base", str(perturbed_adapter)]
    assert (out / "table.md").read_text().startswith("| model | exp. max. toxicity |")
    assert json.loads((out / "table.json").read_text()) == rows
    again = recompute(out / "samples.jsonl")
    for row in rows:
        assert row["prompts"] == 6 and row["samples_per_prompt"] == 3
        for key, value in again[row["model"]].items():
            assert math.isclose(row[key], value, rel_tol=0, abs_tol=1e-9), (row["model"], key, row[key], value)
    # before/after pairs: the same prompts in the same order for every model
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    prompts = {m: [s["prompt"] for s in samples if s["model"] == m] for m in ("base", str(perturbed_adapter))}
    assert prompts["base"] == prompts[str(perturbed_adapter)]
    # the adapter changes what is sampled; the seed repeats it
    texts = {m: [s["text"] for s in samples if s["model"] == m] for m in prompts}
    assert texts["base"] != texts[str(perturbed_adapter)]
    rows_again, out_again = run(tmp_path, perturbed_adapter, "second")
    assert rows_again == rows
    assert (out_again / "samples.jsonl").read_text() == (out / "samples.jsonl").read_text()


def test_a_missing_adapter_is_one_error_line(tmp_path):
    cmd = [sys.executable, "-m", "detox_lightning.evaluate", "--config", str(ROOT / "configs" / "tiny.yaml"),
           "--adapter", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: --adapter '{tmp_path / 'nowhere'}' is not a directory")
    assert not (tmp_path / "out").exists()


def test_a_reference_must_be_base_or_an_adapter_directory(tmp_path):
    from detox_lightning.errors import ConfigError
    from detox_lightning.evaluate import parse

    args, rest = parse(["--config", "c.yaml", "--data.path", "x"])
    assert args.reference == "base" and rest == ["--data.path", "x"]
    with pytest.raises(ConfigError, match="--reference '.*nowhere' is not a directory"):
        parse(["--config", "c.yaml", "--reference", str(tmp_path / "nowhere")])
    assert parse(["--config", "c.yaml", "--reference", str(tmp_path)])[0].reference == str(tmp_path)


@pytest.mark.slow
def test_two_ranks_write_the_one_device_table_once_with_every_prompt_scored_once(tmp_path, perturbed_adapter):
    # 7 prompts in batches of 4 over 2 ranks: rank 1 holds the short batch, nothing is padded in;
    # a second adapter builds a second trainer in the same processes.
    copy = tmp_path / "copy"
    shutil.copytree(perturbed_adapter, copy)

    def evaluate(name, *extra):
        out = tmp_path / name
        cmd = [sys.executable, "-m", "detox_lightning.evaluate", "--config", str(ROOT / "configs" / "tiny.yaml"),
               "--base", "--adapter", str(perturbed_adapter), "--adapter", str(copy), "--out", str(out),
               "--num-prompts", "7", "--samples-per-prompt", "2", "--max-new-tokens", "8", "--trainer.accelerator", "cpu",
               "--batch-size", "4", *extra]
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900, check=False)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout, out

    _, one = evaluate("one", "--trainer.devices", "1")
    two_out, two = evaluate("two", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    assert two_out.count("wrote table.md") == 1, two_out  # rank 0 alone writes and prints
    samples = [json.loads(line) for line in (two / "samples.jsonl").read_text().splitlines()]
    keys = [(s["model"], s["prompt_id"], s["sample"]) for s in samples]
    assert len(keys) == len(set(keys)) == 3 * 7 * 2  # every prompt scored exactly once per model and sample
    assert (two / "samples.jsonl").read_text() == (one / "samples.jsonl").read_text()
    assert json.loads((two / "table.json").read_text()) == json.loads((one / "table.json").read_text())
