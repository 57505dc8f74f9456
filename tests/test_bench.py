"""The benchmark entry point runs offline on the tiny shape and ends with its JSON line (no timings checked)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detox_lightning.bench.memory import reset_peak
from detox_lightning.bench.ways import Clock

REPO = Path(__file__).resolve().parents[1]
KEYS = {
    "s_per_iter", "s_per_iter_notebook", "speedup", "s_floor", "ratio_to_floor", "peak_rss_mb",
    "peak_rss_mb_notebook", "eval_prompts_per_s", "eval_prompts_per_s_notebook", "shape", "dtype", "threads",
    "versions",
}


TINY = ["--shape", "tiny", "--reward-shape", "tiny", "--mini-batch-size", "2", "--new-tokens", "4", "--iters", "1"]


def test_bench_tiny_prints_json_with_every_key(tmp_path):
    cmd = [
        sys.executable, "-m", "detox_lightning.bench", *TINY, "--batch-size", "4", "--reward-quantize", "int8",
        "--eval-prompts", "4", "--eval-batch-size", "2", "--model-dir", str(tmp_path / "models"),
    ]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert KEYS <= result.keys()
    for key in KEYS - {"shape", "dtype", "versions"}:
        assert result[key] > 0, key
    assert (result["shape"], result["dtype"], result["new_tokens"]) == ("tiny", "float32", 4)
    assert set(result["split"]) == {"ours", "notebook", "floor"}
    assert set(result["rss_phases_mb"]) == {"ours", "notebook", "floor"}
    assert "| ours |" in res.stdout and "| notebook |" in res.stdout
    # the module and the floor score with the int8 reward, the notebook's loop in float32 as the notebook
    assert (result["reward_precision"], result["reward_precision_notebook"]) == ("int8-dynamic", "float32")
    assert (result["estimator"], result["samples_per_prompt"], result["responses_per_iter"]) == ("gae", 1, 4)


@pytest.mark.parametrize(("estimator", "generation"), [("rloo", "plain"), ("grpo", "fast")])
def test_bench_tiny_times_each_critic_free_estimator_at_equal_responses(tmp_path, estimator, generation):
    cmd = [
        sys.executable, "-m", "detox_lightning.bench", *TINY, "--estimator", estimator, "--samples-per-prompt", "2",
        "--batch-size", "2", "--skip-notebook", "--skip-eval", "--model-dir", str(tmp_path / "models"),
        "--generation", generation,
    ]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert (result["estimator"], result["samples_per_prompt"], result["responses_per_iter"]) == (estimator, 2, 4)
    assert set(result["split"]) == {"ours", "floor"}  # the floor stays PPO, on the prompts repeated
    assert result["s_per_iter"] > 0 and result["peak_rss_mb"] > 0 and result["peak_rss_mb_floor"] > 0
    assert result["reward_precision"] == "float32" and result["generation"] == generation
    assert f"{estimator}, 2 prompts x 2" in res.stdout


def test_bench_tiny_causal_policy_runs_every_way_on_a_llama_shape(tmp_path):
    cmd = [
        sys.executable, "-m", "detox_lightning.bench", *TINY, "--policy", "causal", "--batch-size", "4",
        "--skip-memory", "--eval-prompts", "4", "--eval-batch-size", "2", "--model-dir", str(tmp_path / "models"),
    ]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert (result["policy"], result["new_tokens"]) == ("causal", 4)
    assert set(result["split"]) == {"ours", "notebook", "floor"}
    assert result["speedup"] > 0 and result["eval_prompts_per_s"] > 0
    config = json.loads((tmp_path / "models" / "policy" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == 32128
    # a seq2seq run refuses the causal models rather than timing the wrong architecture
    res = subprocess.run(cmd[:cmd.index("--policy")] + cmd[cmd.index("--policy") + 2:], cwd=REPO,
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode != 0 and "error: --model-dir" in res.stderr


def test_bench_reports_the_speedup_without_the_evaluation(tmp_path):
    cmd = [sys.executable, "-m", "detox_lightning.bench", *TINY, "--batch-size", "2", "--skip-eval", "--skip-memory",
           "--model-dir", str(tmp_path / "models")]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["speedup"] == pytest.approx(result["s_per_iter_notebook"] / result["s_per_iter"])
    assert result["eval_speedup"] is None


def test_bench_names_every_bad_flag():
    cmd = [sys.executable, "-m", "detox_lightning.bench", "--batch-size", "6", "--mini-batch-size", "4", "--iters", "0",
           "--grad-accum", "3"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 2
    assert "--batch-size=6 is not divisible by --mini-batch-size=4" in res.stderr
    assert "--iters=0 must be at least 1" in res.stderr
    assert "--mini-batch-size=4 is not divisible by --grad-accum=3" in res.stderr


def test_bench_names_bad_estimator_flags():
    cmd = [sys.executable, "-m", "detox_lightning.bench", "--estimator", "grpo", "--samples-per-prompt", "1"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 2 and "--samples-per-prompt=1 must be at least 2 with --estimator=grpo" in res.stderr
    cmd = [sys.executable, "-m", "detox_lightning.bench", "--estimator", "rloo", "--samples-per-prompt", "3",
           "--batch-size", "2", "--mini-batch-size", "4"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 2
    assert "--batch-size=2 x --samples-per-prompt=3 is not divisible by --mini-batch-size=4" in res.stderr


def test_bench_worker_alone_prints_its_peak_and_each_phase_peak(tmp_path):
    cmd = [
        sys.executable, "-m", "detox_lightning.bench", "--shape", "tiny", "--reward-shape", "tiny", "--worker", "notebook",
        "--batch-size", "4", "--mini-batch-size", "2", "--new-tokens", "4",
    ]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["peak_rss_mb"] > result["baseline_rss_mb"] > 0
    if reset_peak():
        phases = result["rss_phases_mb"]
        assert {"setup", "generate", "reward", "logprobs", "update"} <= phases.keys()
        assert round(result["peak_rss_mb"]) == max(phases.values())


@pytest.mark.skipif(not reset_peak(), reason="needs Linux's /proc/self/clear_refs")
def test_clock_charges_each_phase_its_own_peak():
    clock = Clock(torch.device("cpu"), memory=True)
    with clock("big"):
        big = torch.ones(50_000_000)  # 200 MB, touched
        del big
    with clock("outer"), clock("small"):
        small = torch.ones(5_000_000)  # 20 MB
        del small
    clock.boundary()
    peak = clock.peak_mb
    assert peak["big"] - peak["small"] > 150  # the big tensor was freed before "small" began
    assert peak["outer"] < peak["big"]  # "small" was innermost while its tensor lived
    assert set(clock.totals) == {"big", "outer", "small"}
    assert clock.totals["outer"] >= clock.totals["small"]


def test_bench_refuses_a_model_dir_built_for_another_shape(tmp_path):
    (tmp_path / "reward").mkdir()
    (tmp_path / "reward" / "config.json").write_text("{}")
    (tmp_path / "bench_shapes.json").write_text(json.dumps({"shape": "small", "reward_shape": "base"}))
    cmd = [sys.executable, "-m", "detox_lightning.bench", "--shape", "base", "--model-dir", str(tmp_path)]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 1
    assert "holds {'shape': 'small', 'reward_shape': 'base'} models, not {'shape': 'base'" in res.stderr
