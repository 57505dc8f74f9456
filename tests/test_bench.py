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


TINY = ["--shape", "tiny", "--reward-shape", "tiny", "--mini-batch-size", "2", "--new-tokens", "4", "--iters", "1",
        "--peak-size", "128"]
PHASES = {"generate", "reward", "logprobs", "update"}
EFFICIENCY_KEYS = {"peak_gflops", "peak_gflops_used", "flops", "tokens", "gflops_per_s", "peak_fraction", "flop_bound_s",
                   "flop_bound_s_padded", "flop_bound_multiple", "generate_step_ms", "generate_step_overhead_ms"}


def test_bench_tiny_prints_json_with_every_key(tmp_path):
    cmd = [
        sys.executable, "-m", "detox_lightning.bench", *TINY, "--batch-size", "4", "--reward-quantize", "int8",
        "--eval-prompts", "4", "--eval-batch-size", "2", "--model-dir", str(tmp_path / "models"), "--iters", "2",
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
    # the FLOP table: every phase counted with and without padding, against a peak measured in the run
    assert EFFICIENCY_KEYS <= result.keys()
    assert result["peak_gflops"]["float32"] > 0 and result["peak_gflops_used"] == result["peak_gflops"]["float32"]
    for name in ("flops", "tokens", "gflops_per_s", "peak_fraction"):
        assert set(result[name]) == PHASES, name
    for phase in PHASES:
        assert 0 < result["flops"][phase]["useful"] <= result["flops"][phase]["padded"], phase
        assert 0 < result["tokens"][phase]["useful"] <= result["tokens"][phase]["padded"], phase
        assert result["peak_fraction"][phase] == pytest.approx(result["gflops_per_s"][phase] / result["peak_gflops_used"])
    useful = sum(f["useful"] for f in result["flops"].values())
    assert result["flop_bound_s"] == pytest.approx(useful / result["peak_gflops_used"] / 1e9)
    assert result["flop_bound_multiple"] == pytest.approx(result["s_per_iter"] / result["flop_bound_s"])
    # two timed iterations, the second round backwards (ABBA); generate counted once an iteration
    assert result["order"] == "ours, notebook, floor then floor, notebook, ours" and result["iters"] == 2
    assert result["generate_steps"] == 4 and result["generation"] == "fast"  # the module's default sampling
    assert "| generate |" in res.stdout and "FLOP-bound time" in res.stdout and "per-step overhead" in res.stdout
    assert result["reference_pass"] and "KL coefficient 0.2, adaptive: reference pass run" in res.stdout


@pytest.mark.parametrize(("estimator", "generation", "kl"), [
    ("rloo", "plain", []),
    ("grpo", "fast", ["--init-kl-coef", "0", "--fixed-kl"]),  # GRPO with beta 0: no reference pass
])
def test_bench_tiny_times_each_critic_free_estimator_at_equal_responses(tmp_path, estimator, generation, kl):
    cmd = [
        sys.executable, "-m", "detox_lightning.bench", *TINY, "--estimator", estimator, "--samples-per-prompt", "2",
        "--batch-size", "2", "--skip-notebook", "--skip-eval", "--model-dir", str(tmp_path / "models"),
        "--generation", generation, *kl,
    ]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert (result["estimator"], result["samples_per_prompt"], result["responses_per_iter"]) == (estimator, 2, 4)
    assert set(result["split"]) == {"ours", "floor"}  # the floor stays PPO, on the prompts repeated
    assert result["s_per_iter"] > 0 and result["peak_rss_mb"] > 0 and result["peak_rss_mb_floor"] > 0
    assert result["reward_precision"] == "float32" and result["generation"] == generation
    assert f"{estimator}, 2 prompts x 2" in res.stdout
    if kl:  # float32 old log-probs come from generate, so without the reference no pass runs at all
        assert (result["init_kl_coef"], result["adap_kl_ctrl"], result["reference_pass"]) == (0.0, False, False)
        assert result["flops"]["logprobs"] == {"useful": 0.0, "padded": 0.0}
        assert "KL coefficient 0: no reference pass" in res.stdout
    else:
        assert result["reference_pass"] and result["flops"]["logprobs"]["useful"] > 0


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


def test_bench_reports_the_speedup_without_the_evaluation_or_the_floor(tmp_path):
    # the notebook's response lengths: one draw a prompt from [3, 7), the same in every way
    cmd = [sys.executable, "-m", "detox_lightning.bench", *TINY, "--batch-size", "2", "--skip-eval", "--skip-memory",
           "--skip-floor", "--new-tokens-range", "3", "7", "--model-dir", str(tmp_path / "models")]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["speedup"] == pytest.approx(result["s_per_iter_notebook"] / result["s_per_iter"])
    assert result["eval_speedup"] is None and result["ratio_to_floor"] is None and set(result["split"]) == {"ours", "notebook"}
    assert result["new_tokens_range"] == [3, 7] and "3-6 (one draw a prompt) new tokens" in res.stdout
    assert 3 <= result["generate_steps"] <= 6


def test_bench_names_every_bad_flag():
    cmd = [sys.executable, "-m", "detox_lightning.bench", "--batch-size", "6", "--mini-batch-size", "4", "--iters", "0",
           "--grad-accum", "3"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 2
    assert "--batch-size=6 is not divisible by --mini-batch-size=4" in res.stderr
    assert "--iters=0 must be at least 1" in res.stderr
    assert "--mini-batch-size=4 is not divisible by --grad-accum=3" in res.stderr
    cmd = [sys.executable, "-m", "detox_lightning.bench", "--new-tokens-range", "5", "5", "--init-kl-coef", "-1"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 2
    assert "--new-tokens-range=5 5 must satisfy 1 <= LOW < HIGH" in res.stderr and "--init-kl-coef=-1.0 must be at least 0" in res.stderr


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


def test_rounds_time_every_way_on_every_batch_in_abba_order():
    from detox_lightning.bench.driver import rounds

    ways = ["ours", "notebook", "floor"]
    for n in range(2, 7):  # a warm-up and 1-5 timed batches
        batches = list(range(n))
        got = rounds(ways, batches)
        assert [b for _, bs in got for b in bs] == batches  # every batch once, in order, the warm-up first
        assert got[0][0] == ways and got[0][1][0] == 0
        if n > 2:  # two timed batches or more: a second round, backwards, with half of them
            assert [o for o, _ in got] == [ways, ways[::-1]]
            assert len(got[0][1]) - 1 == -(-(n - 1) // 2)  # ceil(timed / 2) forward
    assert rounds(["ours"], list(range(4))) == [(["ours"], [0, 1, 2, 3])]  # one way: one round
