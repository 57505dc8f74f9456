"""Rollout monitor: its figures against hand values, its bands, and stop / rollback on a reward
that pays for repeating one token (the degenerate repetition of trl #242)."""

import collections
import json
import logging

import lightning.pytorch as pl
import pytest
import torch
from helpers import fit
from safetensors.torch import load_file

from detox_lightning import GenerationSettings, PolicyConfig, RewardModel, RLDetoxModule, RLSettings
from detox_lightning.errors import ConfigError
from detox_lightning.evaluation.monitor import (
    Band,
    RolloutMonitor,
    RolloutStats,
    check_bands,
    distinct_n,
    pearson,
    repeated_ngram_rate,
    rollout_figures,
)
from detox_lightning.evaluation.toxicity import ToxicityEvaluation
from detox_lightning.io.checkpoint import RLCheckpoint, load_checkpoint_file
from detox_lightning.models.rollout import RolloutRecord

# ---- figures against hand values ----


def test_distinct_n_counts_unique_ngrams_over_the_batch():
    responses = [[1, 2, 3, 1], [1, 2, 5]]
    # unigrams: 1 2 3 1 1 2 5 -> 4 distinct of 7; bigrams: 12 23 31 12 25 -> 4 distinct of 5
    assert distinct_n(responses, 1) == pytest.approx(4 / 7)
    assert distinct_n(responses, 2) == pytest.approx(4 / 5)
    assert distinct_n([[7, 7, 7, 7]], 2) == pytest.approx(1 / 3)
    assert distinct_n([[1], []], 2) == 0.0  # no bigram at all: no diversity


def test_repeated_ngram_rate_counts_repeats_within_each_response_only():
    # "sodium sodium sodium sodium": bigrams ss ss ss, two repeat the first
    assert repeated_ngram_rate([[9, 9, 9, 9]], 2) == pytest.approx(2 / 3)
    # "a brown a brown dollars": ab ba ab bd -> one repeat of 4
    assert repeated_ngram_rate([[1, 2, 1, 2, 3]], 2) == pytest.approx(1 / 4)
    # the same bigram in two responses is not a repeat; pooled: (0 + 1) / (2 + 2)
    assert repeated_ngram_rate([[1, 2, 3], [1, 2, 1, 2]], 2) == pytest.approx(1 / 5)
    assert repeated_ngram_rate([[1, 2, 1, 2, 1]], 3) == pytest.approx(1 / 3)  # 121 212 121
    assert repeated_ngram_rate([[1]], 2) == 0.0


def test_pearson_is_nan_for_a_constant_sample():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 1, 1], [1, 2, 3]) != pearson([1, 1, 1], [1, 2, 3])  # nan


def test_rollout_figures_from_a_record_split_eos_cap_and_length():
    eos, pad = 1, 0
    record = RolloutRecord(
        queries=["q"] * 3,
        responses=["", "", ""],
        # 3 tokens + EOS; capped at 4 without EOS; EOS right away
        response_ids=torch.tensor([[5, 6, 5, eos], [7, 7, 7, 7], [eos, pad, pad, pad]]),
        mask=torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool),
        max_new_tokens=4,
        end_token_ids=[eos],
        scores=torch.tensor([1.0, 2.0, 3.0]),
        kl=torch.tensor([0.5, 1.5, 1.0]),
    )
    stats = RolloutStats.of(record)
    assert stats.tokens == [[5, 6, 5], [7, 7, 7, 7], []]
    assert stats.eos == [True, False, True] and stats.capped == [True, True, False] and stats.lengths == [4, 4, 1]
    figures = rollout_figures(stats, repeat_n=2, length_clip=3)
    assert figures["monitor/distinct_1"] == pytest.approx(3 / 7)  # 5 6 5 7 7 7 7
    assert figures["monitor/distinct_2"] == pytest.approx(3 / 5)  # 56 65 77 77 77
    assert figures["monitor/repeated_ngram_rate"] == pytest.approx(2 / 5)
    assert figures["monitor/response_len_mean"] == pytest.approx(3.0)
    assert figures["monitor/response_len_clipped"] == pytest.approx(7 / 3)  # min(4, 3) + min(4, 3) + min(1, 3)
    assert figures["monitor/capped_frac"] == pytest.approx(2 / 3)
    assert figures["monitor/eos_rate"] == pytest.approx(2 / 3)
    assert figures["monitor/kl"] == pytest.approx(1.0)
    assert "monitor/judge_toxicity" not in figures
    stats.judge_toxicity = [0.9, 0.5, 0.1]
    judged = rollout_figures(RolloutStats.merge([stats, stats]), repeat_n=2)  # two ranks' rollouts
    assert judged["monitor/judge_toxicity"] == pytest.approx(0.5)
    assert judged["monitor/judge_reward_corr"] == pytest.approx(-1.0)
    assert judged["monitor/distinct_2"] == pytest.approx(3 / 10)


def test_bands_compare_with_the_first_values():
    first = {"monitor/distinct_2": 0.8, "monitor/response_len_mean": 20.0, "monitor/judge_toxicity": 0.1}
    bands = [
        Band("monitor/distinct_2", "drop", 0.5),
        Band("monitor/response_len_mean", "change", 0.4),
        Band("monitor/kl", "ceiling", 10.0),
        Band("monitor/judge_toxicity", "rise", 0.2),
    ]
    inside = {"monitor/distinct_2": 0.41, "monitor/response_len_mean": 27.9, "monitor/kl": 10.0, "monitor/judge_toxicity": 0.29}
    assert check_bands(first, inside, bands) == []
    outside = {"monitor/distinct_2": 0.39, "monitor/response_len_mean": 11.9, "monitor/kl": 10.1, "monitor/judge_toxicity": 0.31}
    breaches = check_bands(first, outside, bands)
    assert [b.band.metric for b in breaches] == [b.metric for b in bands]
    assert breaches[0].line(5) == (
        "monitor: iteration 5: distinct-2 0.39 (first 0.8, -51%) is outside its band: "
        "falls at most 50% below the first iteration's"
    )
    assert "KL 10.1 is outside its band: at most 10" in breaches[2].line(5)
    # longer by more than 40% is a breach too; a missing or nan figure never is
    assert check_bands(first, {"monitor/response_len_mean": 28.1}, bands)
    assert check_bands(first, {"monitor/distinct_2": float("nan")}, bands) == []
    assert check_bands({}, {"monitor/distinct_2": 0.0}, bands) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_distinct_2_drop": 1.5}, "max_distinct_2_drop=1.5 must lie in (0, 1]"),
        ({"max_length_change": 0.0}, "max_length_change=0.0 must lie in (0, 1]"),
        ({"rollback_factor": -0.5}, "rollback_factor=-0.5 must lie in (0, 1]"),
        ({"max_distinct_2_drop": float("nan")}, "max_distinct_2_drop=nan is not a number"),
        ({"max_kl": "high"}, "max_kl='high' is not a number"),
        ({"max_kl": 0}, "max_kl=0 must be greater than 0"),
        ({"action": "panic"}, "action='panic' is not one of warn, stop, rollback"),
    ],
)
def test_bad_bands_are_refused_at_construction(kwargs, message):
    with pytest.raises(ConfigError, match="RolloutMonitor: .*" + message.replace("(", r"\(").replace("[", r"\[").replace("]", r"\]")):
        RolloutMonitor(**kwargs)


# ---- a reward that pays for repeating one token ----


class RepeatReward(RewardModel):
    """10 x the share of the response's most frequent word: the cheapest text to write is one word, repeated."""

    def __init__(self) -> None:
        super().__init__("response")

    def score(self, texts):
        shares = [max(collections.Counter(t.split()).values()) / len(t.split()) if t.split() else 0.0 for t in texts]
        return 10.0 * torch.tensor(shares)

    def toxicity(self, texts):
        return torch.zeros(len(texts))


def repeat_module(tiny_t5, learning_rate=5e-2):
    return RLDetoxModule(
        reward=RepeatReward(),
        policy=PolicyConfig(model_name_or_path=tiny_t5, lora_r=8, lora_alpha=16),
        ppo=RLSettings(learning_rate=learning_rate, mini_batch_size=4, ppo_epochs=2),
        generation=GenerationSettings(output_min_length=16, output_max_length=16),
        batch_size=8,
    )


def monitor_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("monitor:")]


def test_stop_ends_a_repetition_run_on_distinct_2_and_the_last_checkpoint_loads(tiny_t5, sample_data, tmp_path, caplog):
    pl.seed_everything(0)
    module = repeat_module(tiny_t5)
    monitor = RolloutMonitor(action="stop")
    evaluation = ToxicityEvaluation(num_prompts=8, max_new_tokens=8, batch_size=8, bootstrap_resamples=10)
    with caplog.at_level(logging.INFO):
        trainer = fit(module, sample_data, tmp_path, iterations=12, callbacks=[monitor, RLCheckpoint(), evaluation])

    iterations = trainer.fit_loop.epoch_loop.batch_progress.total.processed
    assert 2 <= iterations <= 6, iterations  # stopped within a few iterations, not at 12
    lines = monitor_lines(caplog)
    breach = [line for line in lines if "is outside its band" in line]
    assert len(breach) == 1 and breach[0].startswith(f"monitor: iteration {iterations}: distinct-2 "), lines
    assert "falls at most 50% below the first iteration's; action: stop" in breach[0]
    assert any(line.startswith(f"monitor: stopping after iteration {iterations}") for line in lines)

    log_dir = tmp_path / "lightning_logs" / "version_0"
    assert (log_dir / "evaluation_report.json").is_file()  # the final evaluation still ran
    checkpoint = load_checkpoint_file(log_dir / "checkpoints" / "last.ckpt")
    assert checkpoint["ppo_state"]["iterations"] == iterations
    fresh = repeat_module(tiny_t5)
    fresh.load_state_dict(checkpoint["state_dict"])
    fresh.on_load_checkpoint(checkpoint)
    for name, param in fresh.trainable_parameters().items():
        assert torch.equal(param, module.trainable_parameters()[name]), name


def test_rollback_restores_the_last_in_band_state_lowers_the_learning_rate_and_goes_on(
    tiny_t5, sample_data, tmp_path, caplog
):
    pl.seed_everything(2)  # with the default (inverse-CDF) sampling this run first breaches after an in-band iteration
    module = repeat_module(tiny_t5)
    monitor = RolloutMonitor(action="rollback", rollback_factor=0.5, max_rollbacks=5)
    checkpoints = RLCheckpoint(every_n_iterations=1, save_top_k=-1)
    with caplog.at_level(logging.INFO):
        trainer = fit(module, sample_data, tmp_path, iterations=8, callbacks=[monitor, checkpoints])

    assert trainer.fit_loop.epoch_loop.batch_progress.total.processed == 8  # went on to the end
    assert monitor.rolled_back, monitor_lines(caplog)
    breach_at, restored = monitor.rolled_back[0]
    assert 1 <= restored < breach_at - 1  # the state that sampled breach_at's rollouts was already out of band
    assert any(line.startswith(f"monitor: rolled back to the state after iteration {restored} ") for line in monitor_lines(caplog))

    def saved(iteration):
        return load_checkpoint_file(next(tmp_path.rglob(f"epoch=0-iteration={iteration}.ckpt")))

    # The checkpoint written at the breach holds the in-band state, as its own checkpoint saved it
    after, good = saved(breach_at), saved(restored)
    assert after["state_dict"].keys() == good["state_dict"].keys()
    for name, tensor in good["state_dict"].items():
        assert torch.equal(after["state_dict"][name], tensor), name
    moments = [s["exp_avg"] for s in good["optimizer_states"][0]["state"].values()]
    assert moments and all(
        torch.equal(a["exp_avg"], b) for a, b in zip(after["optimizer_states"][0]["state"].values(), moments, strict=True)
    )
    # the adaptive KL coefficient, which moved at every iteration since, comes back with the weights
    assert after["ppo_state"]["kl_controller"] == good["ppo_state"]["kl_controller"]
    assert saved(breach_at - 1)["ppo_state"]["kl_controller"] != good["ppo_state"]["kl_controller"]
    lr = [g["lr"] for g in good["optimizer_states"][0]["param_groups"]]
    assert [g["lr"] for g in after["optimizer_states"][0]["param_groups"]] == pytest.approx([x * 0.5 for x in lr])
    # ... and the run trained on from there: the next checkpoint differs
    nxt = saved(breach_at + 1)["state_dict"]
    assert any(not torch.equal(nxt[n], t) for n, t in good["state_dict"].items())


def test_every_shipped_ppo_config_runs_the_monitor():
    from importlib import import_module
    from pathlib import Path

    import yaml

    def import_string(path):
        module, _, name = path.rpartition(".")
        return getattr(import_module(module), name)

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    ppo = [c for c in configs if yaml.safe_load(c.read_text())["model"]["class_path"].endswith("RLDetoxModule")]
    assert len(ppo) >= 3
    for config in ppo:
        callbacks = yaml.safe_load(config.read_text())["trainer"].get("callbacks") or []
        classes = [import_string(c["class_path"]) for c in callbacks]
        assert RolloutMonitor in classes, (
            f"configs/{config.name}: add the detox_lightning.evaluation.RolloutMonitor callback (every shipped PPO config runs it)"
        )


# ---- a reward that pays for what the judge flags ----


@pytest.mark.slow
def test_a_gameable_reward_is_caught_by_the_judge_band_and_rolled_back(tiny_t5, quickstart_sft_adapter, sample_data, tmp_path, caplog):
    """The reward pays for a word the judge calls toxic: the judge's toxicity on the rollouts rises
    while the reward rises, the default judge band breaches, and the monitor rolls back."""
    from detox_lightning.rewards import FunctionReward

    pl.seed_everything(0)
    module = RLDetoxModule(
        reward=FunctionReward(function="reward_fns:pays_for_dollars", toxicity_function="reward_fns:flags_dollars"),
        policy=PolicyConfig(model_name_or_path=tiny_t5, adapter_name_or_path=quickstart_sft_adapter),
        ppo=RLSettings(learning_rate=2e-3, mini_batch_size=4, ppo_epochs=2),
        generation=GenerationSettings(min_length=20, output_min_length=32, output_max_length=32),
        batch_size=8,
    )
    judge = FunctionReward(function="reward_fns:pays_for_dollars", toxicity_function="reward_fns:flags_dollars", text="response")
    evaluation = ToxicityEvaluation(
        num_prompts=8, max_new_tokens=8, batch_size=8, bootstrap_resamples=10, judge=judge, text="response",
        export_adapter=False, export_best_adapter=False, plots=False, fluency=False,
    )
    monitor = RolloutMonitor(action="rollback", judge_every_n_iterations=1, max_distinct_2_drop=None, max_length_change=None)
    assert monitor.bands == [Band("monitor/judge_toxicity", "rise", 0.1)]  # the default band, alone here
    with caplog.at_level(logging.INFO):
        fit(module, sample_data, tmp_path, iterations=8, callbacks=[monitor, evaluation])
    breaches = [line for line in monitor_lines(caplog) if "is outside its band" in line]
    assert breaches and all(": judge toxicity " in line for line in breaches), monitor_lines(caplog)
    assert monitor.rolled_back, monitor_lines(caplog)


ROLLBACK_LR = 2e-2


@pytest.fixture(scope="module")
def seeded_rollback(tiny_t5, sample_data, tmp_path_factory):
    """(iteration of the first breach, iteration restored) of the repetition run under seed 0 (at
    a learning rate that leaves a few in-band iterations first)."""
    pl.seed_everything(0)
    monitor = RolloutMonitor(action="rollback", rollback_factor=0.5, max_rollbacks=5)
    fit(repeat_module(tiny_t5, ROLLBACK_LR), sample_data, tmp_path_factory.mktemp("probe"), iterations=8, callbacks=[monitor])
    assert monitor.rolled_back
    return monitor.rolled_back[0]


@pytest.mark.parametrize("evaluation_first", [True, False], ids=["evaluation-then-monitor", "monitor-then-evaluation"])
def test_a_rollback_at_the_last_iteration_is_what_the_report_and_adapter_hold_in_either_callback_order(
    tiny_t5, sample_data, tmp_path, evaluation_first, seeded_rollback
):
    # Ending the same seeded run at its first breach makes the rollback its last act, with an
    # evaluation due at that iteration.
    last, restored = seeded_rollback
    assert 1 <= restored <= last - 2, seeded_rollback  # an evaluation of other weights in between, to tell them apart
    pl.seed_everything(0)
    module = repeat_module(tiny_t5, ROLLBACK_LR)
    monitor = RolloutMonitor(action="rollback", rollback_factor=0.5, max_rollbacks=5)
    evaluation = ToxicityEvaluation(
        num_prompts=8, max_new_tokens=8, batch_size=8, bootstrap_resamples=10, every_n_iterations=1, plots=False
    )
    checkpoints = RLCheckpoint(every_n_iterations=1, save_top_k=-1)
    callbacks = [evaluation, monitor, checkpoints] if evaluation_first else [monitor, evaluation, checkpoints]
    fit(module, sample_data, tmp_path, iterations=last, callbacks=callbacks)
    assert monitor.rolled_back == [(last, restored)], monitor.rolled_back

    log_dir = tmp_path / "lightning_logs" / "version_0"
    report = json.loads((log_dir / "evaluation_report.json").read_text())
    assert report["iteration"] == last and report["weights_iteration"] == restored
    # the final figures are those of the weights the run ended with: the in-band state's, whose
    # own periodic evaluation (same prompts and seeds) gave the same figures
    earlier = {c.iteration: c.metrics for c in evaluation.candidates}
    assert sorted(earlier) == list(range(1, last)), earlier  # the rolled-back state is named by its weights
    assert report["after"] == pytest.approx(earlier[restored], nan_ok=True)
    assert report["after"] != pytest.approx(earlier[last - 1], nan_ok=True)  # else the check above could not tell
    # ... and adapter/ holds those weights: the checkpoint of the restored iteration's
    exported = load_file(log_dir / "adapter" / "adapter_model.safetensors")
    saved = load_checkpoint_file(next(tmp_path.rglob(f"epoch=0-iteration={restored}.ckpt")))["state_dict"]
    lora = {name: tensor for name, tensor in saved.items() if "lora_" in name}
    assert len(lora) == len(exported) > 0
    for name, tensor in exported.items():
        match = [key for key in lora if key.endswith("." + name.removesuffix(".weight") + ".policy.weight")]  # the adapter is named "policy"
        assert len(match) == 1 and torch.equal(lora[match[0]], tensor), name
